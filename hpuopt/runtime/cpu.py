"""The CPU runtime: device-graph semantics without a device.

CI has no accelerator, yet the bugs that matter for device graphs are semantic: an output buffer
that a later replay overwrites, an input that was not copied into its static buffer, a
parameter that moved, an op that cannot be captured. This runtime reproduces those semantics
so the same bugs show up on CPU:

* replay reads the *static input buffers* handed to :meth:`CpuRuntime.capture`, never the
  caller's tensors; a parameter passed without a copy is read through an alias of the storage
  it had at capture, exactly like a device graph that recorded its address;
* every replay writes the *same output buffers*; right after capture they hold NaN (integer
  outputs hold a sentinel), as a device graph's outputs hold garbage until the first replay;
* capture does not run the callable's side effects: the shape probe runs on the warm-up inputs
  (clones of any input the callable mutates);
* with ``check_capture`` the probe runs under a dispatch mode that rejects what a CUDA or HPU
  graph cannot hold (reads back to the host, data-dependent output shapes, non-CPU devices).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hpuopt.errors import CaptureError
from hpuopt.ops import host_sync_reason
from hpuopt.runtime.base import (
    CapturedGraph,
    copy_into,
    empty_like_exact,
    restore_mutated,
    find_output_aliases,
    tensor_nbytes,
    writable,
)

log = logging.getLogger(__name__)

class _CaptureCheckMode(TorchDispatchMode):
    """Raises on ops that a device graph capture would reject."""

    supports_higher_order_operators = True  # with_effects and friends pass through

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        reason = host_sync_reason(func, args)
        if reason is not None:
            raise CaptureError(f"cannot run inside a device graph: {reason}")
        return func(*args, **(kwargs or {}))


def _fill_garbage(t: torch.Tensor) -> torch.Tensor:
    """What a device graph's outputs hold before the first replay: nothing meaningful."""
    w = writable(t)
    if t.is_floating_point() or t.is_complex():
        w.fill_(float("nan"))
    elif t.dtype == torch.bool:
        w.fill_(True)
    else:
        w.fill_(torch.iinfo(t.dtype).min + 7)
    return t


class CpuRuntime:
    """Device-graph semantics on the CPU (see the module docstring)."""

    name = "cpu"
    default_piece_compiler = "eager"

    def __init__(self, check_capture: bool = True) -> None:
        self.check_capture = check_capture
        self._held = 0

    def capture(
        self,
        fn: Callable[..., Sequence[Any]],
        static_inputs: list[Any],
        warmup_runs: int = 0,
        warmup_inputs: list[Any] | None = None,
        pool: Any = None,  # no memory pools here
    ) -> CapturedGraph:
        probe_inputs = static_inputs if warmup_inputs is None else warmup_inputs
        start = time.perf_counter()
        for _ in range(warmup_runs):
            fn(*probe_inputs)
            restore_mutated(probe_inputs, static_inputs)
        try:
            if self.check_capture:
                with _CaptureCheckMode():
                    probe = list(fn(*probe_inputs))
            else:
                probe = list(fn(*probe_inputs))
        except CaptureError:
            raise
        except Exception as exc:  # an op that fails under capture: report it as such
            raise CaptureError(f"{type(exc).__name__}: {exc}") from exc
        outputs = [
            _fill_garbage(empty_like_exact(o)) if isinstance(o, torch.Tensor) else o
            for o in probe
        ]
        aliases = find_output_aliases(probe, probe_inputs)
        for alias in aliases:  # a view of an input is that view of its static buffer, as on a
            outputs[alias.output] = alias.regenerate(static_inputs)  # device: nothing to copy
        viewed = {alias.output for alias in aliases}
        tensor_slots = [
            i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor) and i not in viewed
        ]
        plain = [outputs[i] for i in tensor_slots]
        if len(plain) > 1 and not any(0 in t.stride() for t in plain):

            def replay() -> None:  # one multi-tensor copy instead of one per output
                fresh = fn(*static_inputs)
                torch._foreach_copy_(plain, [fresh[i] for i in tensor_slots])

        else:

            def replay() -> None:
                fresh = fn(*static_inputs)
                for i in tensor_slots:
                    copy_into(outputs[i], fresh[i])

        nbytes = tensor_nbytes(plain)
        self._held += nbytes
        return CapturedGraph(
            static_inputs=static_inputs,
            static_outputs=outputs,
            replay=replay,
            nbytes=nbytes,
            capture_seconds=time.perf_counter() - start,
            aliases=aliases,
        )

    def release(self, graph: CapturedGraph) -> None:
        self._held -= graph.nbytes

    def mark_step(self) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def memory_report(self) -> dict[str, int]:
        return {"graph_bytes": self._held}
