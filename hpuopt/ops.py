"""Op families that more than one layer asks about, keyed by overload packet.

One home for the sets that decide what a device graph can hold, so the split (before capture)
and the runtimes (while capturing) agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

aten = torch.ops.aten
_HigherOrder = torch._ops.HigherOrderOperator

HOST_READ_OPS: frozenset[Any] = frozenset(
    {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal}
)
"""Ops that read a device value back to the host (``.item()``, ``tolist``, truth tests)."""

DATA_DEPENDENT_OPS: frozenset[Any] = frozenset(
    {
        aten.nonzero,
        aten.nonzero_static,  # static shape, but synchronises on CUDA/HPU
        aten.masked_select,
        aten.unique_consecutive,
        aten._unique,
        aten._unique2,
        aten.unique_dim,
        aten.bincount,
        aten.histc,
        aten.repeat_interleave,
    }
)
"""Ops whose output size depends on data, or that synchronise to learn it."""

HIDDEN_HOST_READS: dict[str, str] = {
    "transformers::grouped_mm_fallback":
        "transformers' grouped matmul fallback reads its group offsets on the host "
        "(`offs.tolist()`), which its schema does not show; transformers takes it when torch's "
        "grouped matmul cannot (weights not in bfloat16, an older GPU)",
    "transformers::grouped_mm_fallback_backward":
        "the backward of transformers' grouped matmul fallback reads its group offsets on the "
        "host (`offs.tolist()`)",
}
"""Custom ops whose implementation reads a device value on the host, by their schema name: on a
device they are host reads (a capture would fail, and the offsets would be frozen if it did not);
in a graph on the CPU nothing crosses a device boundary and they stay in static pieces."""


def hidden_host_read(target: Any) -> str | None:
    """Why ``target`` reads a device value on the host inside its implementation, or ``None``
    (:data:`HIDDEN_HOST_READS`)."""
    schema = getattr(target, "_schema", None)
    return HIDDEN_HOST_READS.get(schema.name) if schema is not None else None


UNCAPTURABLE_OPS: frozenset[Any] = HOST_READ_OPS | DATA_DEPENDENT_OPS
"""Ops a device graph cannot hold, whatever their metadata says (``histc`` only when its
arguments leave the range to the data: see :func:`uncapturable`)."""


def histc_fixed_range(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> bool:
    """Whether ``histc(input, bins=100, min=0, max=0)`` is called with a fixed range, ``min <
    max`` as numbers: its output is ``bins`` counts whatever the data, and the kernel never
    looks at the data to choose its range. With ``min == max`` (the default) it computes the
    range from the data's minimum and maximum, a host read on a device (CUDA's kernel copies
    them back); a range given as a traced value cannot be judged and counts as that."""
    kwargs = kwargs or {}
    lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
    hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
    numbers = (int, float)
    return isinstance(lo, numbers) and isinstance(hi, numbers) and \
        not isinstance(lo, bool) and not isinstance(hi, bool) and lo < hi


def uncapturable(packet: Any, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None
                 ) -> bool:
    """Whether a call of ``packet`` (an overload packet) with these arguments is one of
    :data:`UNCAPTURABLE_OPS`, judged by its arguments where they decide (``histc``)."""
    if packet not in UNCAPTURABLE_OPS:
        return False
    return not (packet is aten.histc and histc_fixed_range(args, kwargs))

CHECK_OPS: frozenset[Any] = frozenset(
    {aten._assert_scalar, aten._assert_async, aten.sym_constrain_range,
     aten.sym_constrain_range_for_size}
)
"""Impure only in that dead-code elimination must keep them: they touch no memory, so they are
not ordering barriers."""

MASK_INDEX_OPS: frozenset[Any] = frozenset(
    {aten.index, aten._unsafe_index, aten.index_put, aten.index_put_, aten._unsafe_index_put}
)
"""Indexing ops that find their rows on the host when an index is a boolean mask."""

COLLECTIVE_NAMESPACES = frozenset({"_c10d_functional", "c10d_functional", "c10d", "_dtensor"})

FUSED_ADAM_OPS: frozenset[str] = frozenset({"_fused_adam", "_fused_adamw"})

HOST_CHECK_OPS: frozenset[Any] = frozenset({aten._linalg_check_errors})
"""Kernels that read an error code back to the host (the ``linalg`` family's info checks):
under capture the check would run once, at capture, and never again."""

GRAPH_UNSAFE_OPS: frozenset[Any] = frozenset(
    {aten._fused_moving_avg_obs_fq_helper, aten._fused_moving_avg_obs_fq_helper_functional}
)
"""Ops torch's own CUDA-graph paths refuse by name (``torch/_inductor/utils.py``,
``FORBIDDEN_CUDAGRAPH_OPS``), beyond host reads and asserts."""

UNCAPTURABLE_HIGHER_ORDER = frozenset({"while_loop", "run_and_save_rng_state", "run_with_rng_state"})
"""Higher-order ops a device graph cannot hold: a loop decides each iteration on the host; the
RNG-state wrappers read and set the generator's state on the host."""


def is_bool_index(indices: Sequence[Any] | None, dtype_of: Any = None) -> bool:
    """Whether an ``index``-family op's index list holds a boolean (or uint8) mask.

    ``dtype_of`` maps an index to its dtype (``None`` for an absent index); by default an
    index is taken to be a tensor.
    """
    for idx in indices or ():
        dtype = dtype_of(idx) if dtype_of is not None else getattr(idx, "dtype", None)
        if dtype in (torch.bool, torch.uint8):
            return True
    return False


def capture_unsafe_reason(target: Any, args: Sequence[Any], val: Any) -> tuple[str, str] | None:
    """``(category, why)`` when a node calling ``target`` (fake ``args`` values, output
    ``val``) cannot be captured, else ``None``; the category is a split reason.

    Decided before any capture, from what torch's own CUDA-graph paths refuse: ops tagged
    ``cudagraph_unsafe``, error checks that read the device, uncapturable higher-order ops, a
    ``cond`` whose predicate is a tensor (read on the host to pick a branch), sparse outputs.
    """
    packet = getattr(target, "overloadpacket", None)
    unsafe_tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if unsafe_tag is not None and unsafe_tag in getattr(target, "tags", ()):
        return "known_uncapturable", "op is tagged cudagraph_unsafe"
    if packet in GRAPH_UNSAFE_OPS:
        return "known_uncapturable", "op is refused by device-graph capture"
    if packet in HOST_CHECK_OPS:
        return "host_read", "checks an error code on the host (a device sync)"
    name = getattr(target, "__name__", None) if isinstance(target, _HigherOrder) else None
    if name in UNCAPTURABLE_HIGHER_ORDER:
        return "host_read", f"higher-order op {name} decides on the host"
    if name == "cond" and args and isinstance(args[0], torch.Tensor):
        return "host_read", "cond reads its tensor predicate on the host to pick a branch"
    if isinstance(val, torch.Tensor) and val.layout != torch.strided:
        return "known_uncapturable", f"produces a {val.layout} tensor"
    return None


def host_sync_reason(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None
                     ) -> str | None:
    """Why running ``func(*args)`` inside a device graph is impossible, or ``None``.

    Used while capturing: an op that reads a device value back to the host, or whose output
    size depends on data (``index`` with a boolean mask calls ``nonzero`` internally).
    """
    packet = func.overloadpacket
    if uncapturable(packet, args, kwargs):
        return f"{func} synchronises with the host"
    if packet in MASK_INDEX_OPS and is_bool_index(args[1] if len(args) > 1 else ()):
        return f"{func} with a boolean mask has a data-dependent size"
    return None
