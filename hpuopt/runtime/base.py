"""The runtime protocol: what every platform (CPU, CUDA, HPU) supplies.

A runtime captures a callable on static input buffers and hands back a :class:`CapturedGraph`
whose ``replay()`` re-runs the captured work reading the same input buffers and writing the same
output buffers. Everything around that — which inputs to copy, keys, eviction, cloning what
escapes, fallbacks — lives in :mod:`hpuopt.runtime.runner` and the modules it composes, shared
by all platforms.

Nothing outside ``hpuopt/runtime/`` touches ``torch.cuda`` graph APIs or ``habana_frameworks``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@dataclasses.dataclass
class CapturedGraph:
    """A captured device graph and the buffers it owns.

    ``static_inputs[i]`` is the buffer that replay reads for input ``i``; ``static_outputs`` are
    the buffers every replay writes. ``nbytes`` counts the memory the runtime's capture holds
    (outputs, the graph's private allocations when known); the static input copies the runner
    made are counted by its entry (:class:`hpuopt.runtime.entry.Entry`), and ``nbytes`` is what
    :meth:`Runtime.release` gives back. Nothing in hpuopt changes a graph after its runtime
    returned it.
    ``executed`` says whether capturing also ran the work (HPU Graphs do, CUDA Graphs do not):
    then the outputs already hold the first call's results and the first replay is skipped, so
    in-place updates of parameters happen once.
    """

    static_inputs: list[Any]
    static_outputs: list[Any]
    replay: Callable[[], None]
    nbytes: int = 0
    capture_seconds: float = 0.0
    executed: bool = False
    aliases: tuple[OutputAlias, ...] = ()
    """Outputs that are views of inputs (see :class:`OutputAlias`)."""
    handle: Any = None
    """The platform's own record of the graph, for its ``release`` (opaque to everyone else)."""


@runtime_checkable
class Runtime(Protocol):
    """One platform's device-graph primitives."""

    name: str
    default_piece_compiler: str
    """The piece compiler ``piece_compiler="auto"`` picks on this runtime
    (:mod:`hpuopt.runtime.compilers`)."""

    def capture(
        self,
        fn: Callable[..., Sequence[Any]],
        static_inputs: list[Any],
        warmup_runs: int,
        warmup_inputs: list[Any] | None = None,
        pool: Hashable = None,
    ) -> CapturedGraph:
        """Warms ``fn`` up ``warmup_runs`` times on ``warmup_inputs`` (``static_inputs`` when
        ``None``; the runner passes clones of the inputs ``fn`` mutates, so warm-up side effects
        do not reach them), captures it on ``static_inputs``, and returns the captured graph.
        The graph is the caller's from then on, not changed by the runtime until ``release``.

        ``pool`` names the memory pool the graph may share with other graphs captured under
        the same name (a runtime without pools ignores it). The caller promises that no two
        graphs of one pool replay while the outputs of the other are still needed.

        Raises :class:`hpuopt.errors.CaptureError` when ``fn`` cannot be captured.
        """
        ...

    def release(self, graph: CapturedGraph) -> None:
        """Frees what ``graph`` holds (called when the cache evicts it)."""
        ...

    def mark_step(self) -> None:
        """Flushes queued work (Gaudi lazy mode); a no-op elsewhere."""
        ...

    def synchronize(self) -> None:
        """Waits for the device."""
        ...

    def memory_report(self) -> dict[str, int]:
        """Bytes held by captured graphs and their pool, as far as the platform can tell."""
        ...


class SharedRuntime:
    """Mixin for device runtimes with one instance per process (one memory pool, one capture
    stream): ``Runtime.shared()`` creates it on first use."""

    _shared: Any = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> Any:
        with cls._shared_lock:
            if cls.__dict__.get("_shared") is None:
                cls._shared = cls()
            return cls._shared


def tensor_nbytes(values: Sequence[Any]) -> int:
    seen: set[int] = set()
    total = 0
    for v in values:
        if isinstance(v, torch.Tensor) and not v._is_zerotensor():
            storage = v.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
    return total


def empty_like_exact(t: torch.Tensor) -> torch.Tensor:
    """A new tensor with ``t``'s shape, strides, dtype and device.

    Broadcast (stride-0) dimensions are kept: write it through :func:`writable`. A layout
    that overlaps in any other way gets a dense buffer (same values, other strides).
    """
    if t.is_contiguous():
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    try:
        buf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    except RuntimeError:
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    if not non_overlapping(writable(buf)):
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return buf


def non_overlapping(t: torch.Tensor) -> bool:
    """No two positions of ``t`` share memory. (torch's own check answers "too hard" for any
    non-contiguous layout, a row-padded one included.)"""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    reach = 1
    for stride, size in dims:
        if stride < reach:
            return False
        reach = stride * size
    return True


def restore_mutated(warm: Sequence[Any], static: Sequence[Any]) -> None:
    """Resets the warm-up's copies of mutated inputs (the entries of ``warm`` that are not
    ``static``'s own) to the static values: each warm-up run, and the capture after them, then
    starts from the state the replays will start from. (A cache position advanced twice would
    index past the cache in the capture though the real call is valid.)"""
    if warm is static:
        return
    for w, s in zip(warm, static):
        if w is not s and isinstance(w, torch.Tensor) and isinstance(s, torch.Tensor):
            copy_into(w, s)


def clone_exact(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with ``t``'s strides. ``clone()`` makes a non-dense tensor dense, which
    loses layouts kernels rely on: an attention bias sliced out of a row-padded buffer keeps its
    aligned row stride only in a copy with the same strides (CUDA's memory-efficient attention
    refuses a misaligned one)."""
    if t.is_contiguous():
        return t.clone()
    buf = empty_like_exact(t)
    copy_into(buf, t)
    return buf


def writable(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its broadcast dims (stride 0, size > 1 narrowed to 1): a view that can be
    the target or source of ``copy_`` when ``t`` is an expanded tensor."""
    if 0 not in t.stride():
        return t
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:
            t = t.narrow(d, 0, 1)
    return t


def copy_into(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
    """``dst.copy_(src)`` that also works when both are expanded the same way."""
    if 0 in dst.stride():
        dst, src = writable(dst), writable(src)
    dst.copy_(src, non_blocking=non_blocking)


@dataclasses.dataclass(frozen=True)
class OutputAlias:
    """Output ``output`` is a view of input ``input``: replay it as this view of the caller's
    tensor, not as a copy (the caller's writes must show through, as in eager)."""

    output: int
    input: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the input's

    def regenerate(self, args: Sequence[Any]) -> torch.Tensor:
        base = args[self.input]
        return base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)


def _plain(t: Any) -> bool:
    """A dense tensor with real storage and no lazy conjugate/negative bit."""
    return (
        isinstance(t, torch.Tensor)
        and t.numel() > 0
        and not t._is_zerotensor()  # efficient zero tensors have no storage at all
        and t.layout == torch.strided
        and not t.is_conj()
        and not t.is_neg()
        and type(t) in (torch.Tensor, torch.nn.Parameter)
    )


def find_output_aliases(outputs: Sequence[Any], inputs: Sequence[Any]) -> tuple[OutputAlias, ...]:
    """The outputs that share storage with an input (views the graph returns)."""
    by_storage: dict[int, int] = {}
    for j, t in enumerate(inputs):
        if _plain(t):
            by_storage.setdefault(t.untyped_storage().data_ptr(), j)
    found = []
    for i, o in enumerate(outputs):
        if not _plain(o):
            continue
        j = by_storage.get(o.untyped_storage().data_ptr())
        # only views of the same dtype: as_strided counts elements of the input's dtype
        if j is not None and inputs[j].dtype == o.dtype:
            rel = o.storage_offset() - inputs[j].storage_offset()
            found.append(OutputAlias(i, j, tuple(o.shape), tuple(o.stride()), rel))
    return tuple(found)


def eager_forward(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    """``gm``'s generated forward, compiled now: a lazy graph module would otherwise check for
    pending code generation and go through ``nn.Module.__call__`` on every call."""
    real = getattr(gm, "real_recompile", None)
    if real is not None:
        real()
    return gm.forward
