"""The HPU runtime: static pieces on Intel Gaudi, by the bridge's execution mode.

The Gaudi PyTorch bridge runs in one of two modes, chosen by ``PT_HPU_LAZY_MODE`` before it is
imported, and this runtime follows it (``Config.hpu_mode``, read when the config is built):

**Compile mode** (``PT_HPU_LAZY_MODE=0``, the default of recent bridges)
    Eager mode with ``torch.compile``: the bridge's compiler is the ``hpu_backend`` Dynamo
    backend, which ``habana_frameworks.torch.core`` registers in this mode only
    (``habana_frameworks/torch/core/__init__.py``). HPU Graphs are not used: Intel documents
    them as lazy-mode only ("Running HPU Graphs is supported with Lazy mode. Eager mode is
    currently not supported", docs.habana.ai, *HPU Graphs for Training*). Each static piece is
    compiled by ``hpu_backend`` per key (an exact shape, or a bucket: on Gaudi every new shape
    is a graph compilation, which bucketing bounds) and called on the caller's tensors, with no
    static buffers (:mod:`hpuopt.runtime.direct`); dynamic pieces run op by op; no
    ``mark_step`` (a no-op outside lazy mode: ``habana_frameworks/torch/core/step_closure.py``,
    ``mark_step`` is ``@lazy_only``).

**Lazy mode** (``PT_HPU_LAZY_MODE=1``)
    Ops queue until ``mark_step()``; the static pieces are captured as HPU Graphs the way the
    bridge's own ``wrap_in_hpu_graph`` does (``habana_frameworks/torch/hpu/graphs.py``,
    ``wrapped_hpugraph_forward``): on the default stream, ``capture_begin(dry_run=...)``, the
    inputs marked with ``mark_user_inputs`` and the outputs with ``mark_user_outputs`` under
    ``disable_tensor_cache`` (which implies ``dry_run``), ``capture_end``, and right after a
    dry-run capture one replay (a dry run does not launch the work), through ``replayV3`` under
    ``disable_tensor_cache``. ``mark_step`` boundaries come from the ``mark_step`` pass. Whether
    Dynamo can trace a model's lazy tensors at all is the bridge's matter; hpuopt does not know
    of a lazy-mode ``torch.compile`` backend (the bridge registers ``hpu_backend`` in compile
    mode only).

Any other value of ``PT_HPU_LAZY_MODE`` is refused with an error naming it and the values to
set. ``habana_frameworks.torch`` is imported lazily, only when this runtime is chosen (it is not
on PyPI).

Unlike a CUDA Graph, capturing an HPU Graph also executes the work (a dry-run capture followed
by its replay likewise): the static outputs hold the first call's results, so the runtime
reports ``executed=True`` and the runner skips that call's replay (an in-place parameter update
must happen once).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from hpuopt.config import BRIDGE_MODE_VARIABLE, Config
from hpuopt.errors import CaptureError, ConfigError
from hpuopt.runtime.base import (
    CapturedGraph,
    find_output_aliases,
    tensor_nbytes,
)

log = logging.getLogger(__name__)

MODES = ("compile", "lazy")


def load_habana() -> tuple[Any, Any]:
    """``(habana_frameworks.torch, habana_frameworks.torch.core)``, or a clear error."""
    try:
        ht = importlib.import_module("habana_frameworks.torch")
        core = importlib.import_module("habana_frameworks.torch.core")
    except ImportError as exc:
        raise CaptureError(
            "the HPU runtime needs habana_frameworks.torch (Intel Gaudi software stack)"
        ) from exc
    return ht, core


def check_mode(mode: str) -> str:
    """``mode`` if the HPU runtime runs in it; otherwise a :class:`ConfigError` naming it and
    the variable to set."""
    if mode in MODES:
        return mode
    raise ConfigError(
        f"the Gaudi bridge's execution mode {mode} is not one hpuopt runs in: set "
        f"{BRIDGE_MODE_VARIABLE}=0 (eager mode with torch.compile, the bridge's default: pieces "
        f"compiled by hpu_backend) or {BRIDGE_MODE_VARIABLE}=1 (lazy mode: pieces captured as "
        "HPU Graphs with mark_step boundaries) before habana_frameworks is imported"
    )


class HpuRuntime:
    """Static pieces on a Gaudi, in the bridge's compile or lazy mode (module docstring)."""

    name = "hpu"
    _instances: ClassVar[dict[tuple, HpuRuntime]] = {}
    _lock = threading.Lock()

    def __init__(self, habana: tuple[Any, Any] | None = None, mode: str = "compile",
                 disable_tensor_cache: bool = False, dry_run: bool = False) -> None:
        self.mode = check_mode(mode)
        self.ht, self.core = habana if habana is not None else load_habana()
        self.disable_tensor_cache = disable_tensor_cache
        # graphs.py, wrapped_hpugraph_forward: "Enable dry run if tensor cache is disabled"
        self.dry_run = dry_run or disable_tensor_cache
        self.default_piece_compiler = "hpu_backend" if self.mode == "compile" else "eager"
        # compile mode has no device graph: each piece's compiled callable is called on the
        # caller's tensors (hpuopt.runtime.direct), with no static buffers to copy into
        self.captures = self.mode == "lazy"
        self._held = 0

    @classmethod
    def for_config(cls, config: Config) -> HpuRuntime:
        """One runtime per process and setting (the bridge has one default stream)."""
        key = (check_mode(config.hpu_execution_mode), config.hpu_disable_tensor_cache,
               config.hpu_dry_run)
        with cls._lock:
            runtime = cls._instances.get(key)
            if runtime is None:
                runtime = cls._instances[key] = cls(None, *key)
            return runtime

    @classmethod
    def forget(cls) -> None:
        """Drops the shared runtimes (a test that replaces ``habana_frameworks``)."""
        with cls._lock:
            cls._instances.clear()

    def capture(
        self,
        fn: Callable[..., Sequence[Any]],
        static_inputs: list[Any],
        warmup_runs: int = 1,
        warmup_inputs: list[Any] | None = None,
        pool: Any = None,  # no memory pools here
    ) -> CapturedGraph:
        warm = static_inputs if warmup_inputs is None else warmup_inputs
        for _ in range(warmup_runs):
            fn(*warm)
            if self.mode == "lazy":
                self.core.mark_step()  # run the warm-up now, outside the graph
        if self.mode == "compile":  # pragma: no cover - compile mode runs pieces directly
            raise CaptureError("the bridge's compile mode has no HPU Graphs (runtime.direct)")
        return self._hpu_graph(fn, static_inputs)

    def _hpu_graph(self, fn: Callable[..., Sequence[Any]],
                   static_inputs: list[Any]) -> CapturedGraph:
        """Lazy mode: an HPU Graph captured as ``wrapped_hpugraph_forward`` captures one."""
        hpu = self.ht.hpu
        hpu.synchronize()
        user_inputs = [t for t in static_inputs if isinstance(t, torch.Tensor)]
        graph = hpu.HPUGraph()
        with hpu.stream(hpu.default_stream()):
            graph.capture_begin(dry_run=self.dry_run)
            try:
                if self.disable_tensor_cache:
                    graph.mark_user_inputs(user_inputs)
                outputs = list(fn(*static_inputs))
            except Exception as exc:  # an op that cannot be captured: report it as such
                _end_failed_capture(graph)
                raise CaptureError(f"{type(exc).__name__}: {exc}") from exc
            graph.capture_end()
        if self.disable_tensor_cache:
            graph.mark_user_outputs([t for t in outputs if isinstance(t, torch.Tensor)])
            replay = lambda: graph.replayV3(user_inputs)
        else:
            replay = graph.replay
        if self.dry_run:  # the capture launched nothing: the bridge replays once right away
            replay()
        nbytes = tensor_nbytes(outputs)
        self._held += nbytes
        return CapturedGraph(
            static_inputs=static_inputs,
            static_outputs=outputs,
            replay=replay,
            nbytes=nbytes,
            aliases=find_output_aliases(outputs, static_inputs),
            executed=True,
            handle=graph,
        )

    def release(self, graph: CapturedGraph) -> None:
        self._held -= graph.nbytes
        graph.static_outputs.clear()
        reset = getattr(graph.handle, "reset", None)  # graphs.py, HPUGraph.reset
        if reset is not None:
            reset()

    def mark_step(self) -> None:
        if self.mode == "lazy":
            self.core.mark_step()

    def synchronize(self) -> None:
        self.ht.hpu.synchronize()

    def memory_report(self) -> dict[str, int]:
        report = {"graph_bytes": self._held}
        allocated = getattr(self.ht.hpu, "memory_allocated", None)
        if allocated is not None:
            report["allocated"] = int(allocated())
        return report


def _end_failed_capture(graph: Any) -> None:
    """Ends a capture whose work raised, as the bridge's ``graph.__exit__`` does (it calls
    ``capture_end`` whatever happened); the graph is dropped."""
    try:
        graph.capture_end()
    except Exception:  # noqa: BLE001 - the capture's own error, re-raised by the caller, wins
        log.debug("capture_end after a failed capture raised", exc_info=True)
