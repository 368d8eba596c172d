"""The CPU runtime: device-graph semantics without a device.

CI has no accelerator, yet the bugs that matter for device graphs are semantic: an output buffer
that a later replay overwrites, an input that was not copied into its static buffer, a
parameter that moved, an op that cannot be captured. This runtime reproduces those semantics
so the same bugs show up on CPU:

* replay reads the *static input buffers* handed to :meth:`CpuRuntime.capture`, never the
  caller's tensors; a parameter passed without a copy is read through an alias of the storage
  it had at capture, exactly like a device graph that recorded its address;
* every replay writes the *same output buffers*; right after capture they hold NaN (integer
  outputs hold a sentinel), as a device graph's outputs hold garbage until the first replay. A
  piece run by its ATen graph writes them in place, through the ``out=`` overloads of the ops
  that produce them (:mod:`~hpuopt.runtime.out_writer`), all in one allocation, as a device
  graph's kernels write into its pool: no copy a device would not pay. Other outputs (a
  compiled piece's, an op without an ``out=`` overload) are copied into their buffers;
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
from hpuopt.fx_utils import output_node
from hpuopt.ops import host_sync_reason
from hpuopt.runtime.base import (
    CapturedGraph,
    copy_into,
    empty_like_exact,
    find_output_aliases,
    restore_mutated,
    tensor_nbytes,
    writable,
)
from hpuopt.runtime.out_writer import Writes, plan_writes
from hpuopt.runtime.replay_program import mutates_arguments, replay_program

log = logging.getLogger(__name__)

class _CaptureCheckMode(TorchDispatchMode):
    """Raises on ops that a device graph capture would reject."""

    supports_higher_order_operators = True  # with_effects and friends pass through

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        reason = host_sync_reason(func, args, kwargs)
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
        graph = getattr(fn, "hpuopt_graph", None)  # an ATen graph run as is: written in place
        writes = program = None
        try:
            if graph is not None:
                skip = _returned_inputs(graph)
                probe, writes = plan_writes(graph, probe_inputs, self._probe, skip)
                program = _program(graph, writes, probe_inputs, static_inputs)
            else:
                probe = list(self._probe(lambda: fn(*probe_inputs)))
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
        if writes is not None:
            for i, out in writes.outputs.items():
                outputs[i] = out
            for buf in writes.buffers:
                _fill_garbage(buf)
        replay = _replay(fn, static_inputs, outputs, aliases, writes, program)
        kept = outputs + (writes.buffers if writes is not None else [])
        nbytes = tensor_nbytes(kept)
        self._held += nbytes
        return CapturedGraph(
            static_inputs=static_inputs,
            static_outputs=outputs,
            replay=replay,
            nbytes=nbytes,
            capture_seconds=time.perf_counter() - start,
            aliases=aliases,
        )

    def _probe(self, thunk: Callable[[], Any]) -> Any:
        """The capture's one run of the piece, under the capture check when it is on."""
        if self.check_capture:
            with _CaptureCheckMode():
                return thunk()
        return thunk()

    def release(self, graph: CapturedGraph) -> None:
        self._held -= graph.nbytes

    def mark_step(self) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def memory_report(self) -> dict[str, int]:
        return {"graph_bytes": self._held}


def _returned_inputs(graph: Any) -> set[int]:
    """Output positions that hold an input or a constant, never written (views of inputs are
    told apart by the probe's values)."""
    result = output_node(graph).args[0]
    outs = result if isinstance(result, (tuple, list)) else [result]
    return {i for i, o in enumerate(outs)
            if not isinstance(o, torch.fx.Node) or o.op == "placeholder"}


def _program(graph: torch.fx.GraphModule, writes: Writes | None, probe_inputs: list[Any],
             static_inputs: list[Any]) -> Callable[..., Any] | None:
    """The replay program (:mod:`~hpuopt.runtime.replay_program`) of an ATen graph run as is,
    or of its rewrite writing outputs in place, its entry points chosen on the probe's inputs
    (whose mutations are then undone, as after a warm-up run)."""
    module = writes.module if writes is not None else graph
    if probe_inputs is static_inputs and mutates_arguments(module):
        return None  # the choosing run would apply the graph's writes to the static inputs
    inputs = list(probe_inputs) + ([writes.buffers] if writes is not None else [])
    program = replay_program(module, inputs)
    restore_mutated(probe_inputs, static_inputs)
    if program is None or writes is not None:
        return program
    if isinstance(output_node(graph).args[0], (tuple, list)):
        return program
    return lambda *a: [program(*a)]


def _replay(fn: Callable[..., Sequence[Any]], static_inputs: list[Any], outputs: list[Any],
            aliases: Sequence[Any], writes: Writes | None,
            program: Callable[..., Any] | None = None) -> Callable[[], None]:
    """The replay: run the piece on the static inputs (through its replay program when it has
    one); the outputs it wrote in place need nothing more, the others are copied into their
    buffers."""
    if program is not None and writes is None:
        fn = program
    viewed = {alias.output for alias in aliases}
    written = set(writes.outputs) if writes is not None else set()
    slots = [i for i, o in enumerate(outputs)
             if isinstance(o, torch.Tensor) and i not in viewed and i not in written]
    copy = _copier([outputs[i] for i in slots], slots)
    if writes is None:
        return lambda: copy(fn(*static_inputs))
    every = sorted(set(slots) | written)
    copy_every = _copier([outputs[i] for i in every], every)
    forward, buffers, single = program or writes.forward, writes.buffers, writes.single
    current: list[Callable[[], None]] = []

    def in_place() -> None:
        fresh = forward(*static_inputs, buffers)
        copy((fresh,) if single else fresh)

    def first() -> None:
        """Every written output must come back as its buffer: an out= op that raises or writes
        elsewhere sends the graph back to copying its outputs, for good."""
        try:
            fresh = forward(*static_inputs, buffers)
            fresh = (fresh,) if single else fresh
        except Exception:  # the graph as it was answers instead; logged
            log.info("an out= op raised; this graph copies its outputs", exc_info=True)
            current[0] = lambda: copy_every(fn(*static_inputs))
            return current[0]()
        if all(_same_view(fresh[i], outputs[i]) for i in written):
            current[0] = in_place
            return copy(fresh)
        log.info("an out= op did not write its buffer; this graph copies its outputs")
        current[0] = lambda: copy_every(fn(*static_inputs))
        return copy_every(fresh)

    current.append(first)
    return lambda: current[0]()


def _copier(plain: list[torch.Tensor], slots: list[int]) -> Callable[[Sequence[Any]], None]:
    """Copies the fresh outputs at ``slots`` into ``plain``, their buffers."""
    if not slots:
        return lambda fresh: None
    if len(plain) > 1 and not any(0 in t.stride() for t in plain):
        return lambda fresh: torch._foreach_copy_(plain, [fresh[i] for i in slots])

    def each(fresh: Sequence[Any]) -> None:
        for dst, i in zip(plain, slots):
            copy_into(dst, fresh[i])

    return each


def _same_view(fresh: Any, static: torch.Tensor) -> bool:
    return (isinstance(fresh, torch.Tensor) and fresh.data_ptr() == static.data_ptr()
            and fresh.shape == static.shape and fresh.stride() == static.stride())
