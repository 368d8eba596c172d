"""Op families that more than one layer asks about, keyed by overload packet.

One home for the sets that decide what a device graph can hold, so the split (before capture)
and the runtimes (while capturing) agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

aten = torch.ops.aten

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

UNCAPTURABLE_OPS: frozenset[Any] = HOST_READ_OPS | DATA_DEPENDENT_OPS
"""Ops a device graph can never hold, whatever their metadata says."""

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


def host_sync_reason(func: Any, args: Sequence[Any]) -> str | None:
    """Why running ``func(*args)`` inside a device graph is impossible, or ``None``.

    Used while capturing: an op that reads a device value back to the host, or whose output
    size depends on data (``index`` with a boolean mask calls ``nonzero`` internally).
    """
    packet = func.overloadpacket
    if packet in UNCAPTURABLE_OPS:
        return f"{func} synchronises with the host"
    if packet in MASK_INDEX_OPS and is_bool_index(args[1] if len(args) > 1 else ()):
        return f"{func} with a boolean mask has a data-dependent size"
    return None
