"""The HPU runtime: pieces captured as HPU Graphs on Intel Gaudi.

``habana_frameworks.torch`` is imported lazily, only when this runtime is chosen (the package is
not on PyPI). The API used, as the Gaudi bridge defines it:

* ``habana_frameworks.torch.hpu.HPUGraph()`` with ``capture_begin()``, ``capture_end()`` and
  ``replay()``;
* ``habana_frameworks.torch.hpu.graph(g, stream=None)``: a context manager that synchronises,
  makes ``stream`` (or its own side stream) current and brackets the block with
  ``capture_begin``/``capture_end``;
* ``hpu.Stream()``, ``hpu.stream(s)``, ``hpu.current_stream()``, ``hpu.synchronize()``;
* ``habana_frameworks.torch.core.mark_step()``: in lazy mode, flushes the ops queued so far.

Unlike a CUDA Graph, capturing an HPU Graph also executes the work: the static outputs hold the
first call's results, so the runtime reports ``executed=True`` and the runner skips that call's
replay (an in-place parameter update must happen once).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from hpuopt.errors import CaptureError
from hpuopt.runtime.base import (
    CapturedGraph,
    SharedRuntime,
    find_output_aliases,
    tensor_nbytes,
)

log = logging.getLogger(__name__)


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


class HpuRuntime(SharedRuntime):
    name = "hpu"

    def __init__(self, habana: tuple[Any, Any] | None = None) -> None:
        self.ht, self.core = habana if habana is not None else load_habana()
        self.stream = self.ht.hpu.Stream()
        self._held = 0

    def capture(
        self,
        fn: Callable[..., Sequence[Any]],
        static_inputs: list[Any],
        warmup_runs: int = 1,
        warmup_inputs: list[Any] | None = None,
        pool: Any = None,  # no memory pools here
    ) -> CapturedGraph:
        hpu = self.ht.hpu
        warm = static_inputs if warmup_inputs is None else warmup_inputs
        for _ in range(warmup_runs):
            fn(*warm)
            self.core.mark_step()  # lazy mode: run the warm-up now, outside the graph
        hpu.synchronize()
        graph = hpu.HPUGraph()
        try:
            with hpu.graph(graph, stream=self.stream):
                outputs = list(fn(*static_inputs))
        except Exception as exc:  # an op that cannot be captured: report it as such
            raise CaptureError(f"{type(exc).__name__}: {exc}") from exc
        nbytes = tensor_nbytes(outputs)
        self._held += nbytes
        return CapturedGraph(
            static_inputs=static_inputs,
            static_outputs=outputs,
            replay=graph.replay,
            nbytes=nbytes,
            aliases=find_output_aliases(outputs, static_inputs),
            executed=True,
        )

    def release(self, graph: CapturedGraph) -> None:
        self._held -= graph.nbytes
        graph.static_outputs.clear()

    def mark_step(self) -> None:
        self.core.mark_step()

    def synchronize(self) -> None:
        self.ht.hpu.synchronize()

    def memory_report(self) -> dict[str, int]:
        report = {"graph_bytes": self._held}
        allocated = getattr(self.ht.hpu, "memory_allocated", None)
        if allocated is not None:
            report["allocated"] = int(allocated())
        return report
