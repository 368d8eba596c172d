"""Transfer rules of ops that index by data: ``index_select``, ``embedding`` and its backward,
``index.Tensor`` (gathering rows), and the scatter/gather family.

Padded *indices* are safe only with pad value 0 (index 0 is a valid row; arbitrary pad contents
could be out of range); a padded tensor indexed by data is unsafe, unless every index is its own
position (the index fact of ``index_facts.py``: ``arange`` along the indexed dim), which makes
the gather position-preserving. Rules 5 and 8 of
``docs/padding.md``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hpuopt.passes.padding.binding import Row, _Op, _Rule
from hpuopt.passes.padding.domain import (
    _UNPADDED,
    FINITE,
    ZERO,
    _same,
    _same_dim,
    _Tensor,
    _Unsafe,
)


def _index_select(op: _Op) -> _Tensor:
    st, idx = op.tensor("self"), op.tensor("index")
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    dims = list(st.dims or (None,) * rank)
    if idx.padded:
        _need_zero_index(op, idx, "index_select")
    dims[dim] = idx.dim(0)  # index_select rejects negative indices: padded `self` rows are unread
    return _Tensor(tuple(dims), max(st.pad if st.padded else FINITE, FINITE))


def _need_zero_index(op: _Op, idx: _Tensor, what: str, arg: str = "", bound: Any = None,
                     node: Any = None) -> None:
    """Padded indices must be in range in the pad too: positions a ``topk``/``sort``/``argmax``
    returned over a dim no longer than the indexed one (whatever the values were, NaN pad
    included), zero (a zero-filled input's pad), or computed from buffers and sizes alone
    (checked per bucket on the real buffers)."""
    if node is None and arg:
        node = op.raw(arg)
    if bound is not None and isinstance(node, torch.fx.Node) and \
            _positions_within(op, node, bound):
        return
    if idx.pad == ZERO:
        op.an.require_zero(f"{what} with padded indices (pad filled with index 0)")
        return
    if isinstance(bound, int) and isinstance(node, torch.fx.Node) and op.an.param_content(node):
        op.an.require_check(node, "range", bound)
        return
    raise _Unsafe(f"{what} with padded indices: arbitrary pad contents may be out-of-range "
                  "indices (device assert); needs pad value 0")


_SAME_VALUES = frozenset({"view", "reshape", "_unsafe_view", "expand", "clone", "unsqueeze",
                          "squeeze", "flatten", "contiguous", "alias", "permute", "t"})
_POSITIONS = {"topk": 1, "sort": 1, "max": 1, "min": 1}  # which output holds positions


def _positions_within(op: _Op, node: torch.fx.Node, bound: int) -> bool:
    """Whether every value of ``node`` is a position in ``[0, bound)`` by construction: the
    positions output of a ``topk``/``sort``/``max.dim``/``min.dim`` (or an ``argmax``/``argmin``)
    over a dim of static extent at most ``bound``, through views and copies that keep values.
    Such positions are in range in the pad too, whatever the values they were taken from."""
    while node.op == "call_function" and getattr(node.target, "overloadpacket", None) is not None \
            and node.target.overloadpacket.__name__ in _SAME_VALUES:
        node = node.args[0]
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:
        src, which = node.args
        packet = getattr(getattr(src, "target", None), "overloadpacket", None)
        if packet is None or _POSITIONS.get(packet.__name__) != which or len(src.args) < 1:
            return False
        if packet.__name__ in ("max", "min") and len(src.args) < 2:
            return False  # max(x) without a dim has no positions output
        source, dim = src.args[0], _dim_of(src)
    elif getattr(target, "overloadpacket", None) in (torch.ops.aten.argmax, torch.ops.aten.argmin):
        source, dim = node.args[0], _dim_of(node)
        if dim is None:
            return False
    else:
        return False
    shape = op.an.shape_of(source)
    if dim is None or not shape:
        return False
    extent = shape[dim % len(shape)]
    return bool(statically_known_true(extent <= bound))


def _dim_of(node: torch.fx.Node) -> int | None:
    """The ``dim`` argument of a reduction-like call (default -1 for topk and sort)."""
    if len(node.args) > (2 if node.target.overloadpacket.__name__ == "topk" else 1):
        dim = node.args[2] if node.target.overloadpacket.__name__ == "topk" else node.args[1]
    else:
        dim = node.kwargs.get("dim", -1 if node.target.overloadpacket.__name__ in ("topk", "sort")
                              else None)
    return dim if isinstance(dim, int) else None


def _embedding(op: _Op) -> _Tensor:
    w, idx = op.tensor("weight"), op.tensor("indices")
    # A padded table (dim 0) is fine: the real indices only read its real rows.
    if idx.padded:
        rows = op.shape("weight")[0]
        _need_zero_index(op, idx, "embedding", "indices", rows if w.dim(0) is None else None)
    dims = tuple(idx.dims or (None,) * op.rank("indices")) + (w.dim(1),)
    return _Tensor(dims, FINITE)


def _embedding_backward(op: _Op) -> _Tensor:
    grad, idx = op.tensor("grad_output"), op.tensor("indices")
    if grad.dim(len(op.shape("grad_output")) - 1) is not None:
        raise _Unsafe("embedding backward with a padded embedding dim")
    if idx.padded or grad.padded:
        _need_zero_index(op, idx, "embedding backward")
        if grad.pad != ZERO:
            raise _Unsafe("embedding backward sums the padded rows' gradient into row 0; exact "
                          "only if that gradient's pad is zero")
    return _Tensor(None, FINITE)


def _index_tensor(op: _Op) -> _Tensor:
    st = op.tensor("self")
    indices = op.raw("indices")
    given = [k for k, t in enumerate(indices) if t is not None]
    gathered = _position_preserving(op, st, indices, given)
    if gathered is not None:
        return gathered
    if st.padded or len(given) != 1:
        raise _Unsafe("advanced indexing of a padded tensor: indices are data (negative ones "
                      "wrap into the pad)")
    k = given[0]
    idx = op.an.state_of(indices[k])
    idx = idx if isinstance(idx, _Tensor) else _UNPADDED
    if idx.padded:
        _need_zero_index(op, idx, "indexing", bound=op.shape("self")[k], node=indices[k])
    idx_rank = len(op.an.shape_of(indices[k]))
    rank = op.rank("self")
    dims = (None,) * k + tuple(idx.dims or (None,) * idx_rank) + (None,) * (rank - k - 1)
    return _Tensor(dims, FINITE)


def _position_preserving(op: _Op, st: _Tensor, indices: Sequence[Any],
                         given: list[int]) -> _Tensor | None:
    """``self[i_0, ..., i_m]`` where each index is an ``arange`` over its own indexed dim (the
    index fact), broadcast against the others: result position ``p`` reads ``self`` at ``p``, so
    padded dims carry over with their pad contents. ``None`` when the indices are not such."""
    if not given or given != list(range(given[0], given[0] + len(given))):
        return None
    k0, rank, out_shape = given[0], op.rank("self"), op.out_shape()
    width = len(out_shape) - (rank - len(given))  # the broadcast indices' rank
    self_shape = op.shape("self")
    dims: list[Any] = [None] * len(out_shape)
    moved: dict[int, int] = {}  # self dim -> result dim
    placed: set[int] = set()
    for k in given:
        idx = op.an.state_of(indices[k])
        if not isinstance(idx, _Tensor) or idx.iota is None:
            return None
        shape = op.an.shape_of(indices[k])
        where = idx.iota + width - len(shape)
        if where in placed or any(not _same(n, 1) for i, n in enumerate(shape) if i != idx.iota):
            return None
        placed.add(where)
        own, along = st.dim(k), idx.dim(idx.iota)
        same_extent = _same(shape[idx.iota], self_shape[k])
        here = {x for d in (own, along) if d is not None for x in d.sources}
        if (own is None) != (along is None):  # both unpadded: eager's own gather
            raise _Unsafe(f"indexing dim {k} with positions that are padded differently from it",
                          here or None)
        if own is not None and along is not None:
            if not _same_dim(own, along):
                raise _Unsafe(f"indexing dim {k} with positions laid out differently from it",
                              here)
            if same_extent:
                op.an.tie_dims(own, along)
            else:  # two inputs' sizes (a mask and the ids): exact only when they are equal
                op.an.require_equal(own, along)
        dims[k0 + where] = own
        moved[k] = k0 + where
    for i in range(k0):
        dims[i], moved[i] = st.dim(i), i
    for i in range(k0 + len(given), rank):
        dims[i - len(given) + width], moved[i] = st.dim(i), i - len(given) + width
    fills = tuple(sorted((moved[d], v) for d, v in st.fills if d in moved))
    return _Tensor(tuple(dims), st.pad if st.padded else FINITE, fills=fills)


def _gather(op: _Op) -> _Tensor:
    """``gather`` from an unpadded tensor (a buffer) with padded indices: the result is padded
    like the indices; the indices must be in range in the pad (see :func:`_need_zero_index`)."""
    st, idx = op.tensor("self"), op.tensor("index")
    if st.padded or not idx.padded:
        return _indexing_unsafe(op)
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    extent = op.shape("self")[dim]
    _need_zero_index(op, idx, "gather", "index", extent if isinstance(extent, int) else None)
    return _Tensor(idx.dims, FINITE)


def _indexing_unsafe(op: _Op) -> Any:
    raise _Unsafe("data-dependent indexing of a padded tensor (indices may address the pad)")


ROWS: tuple[Row, ...] = (
    ("index_select", _Rule(_index_select), ("index_select",)),
    ("embedding: padded indices need pad 0", _Rule(_embedding), ("embedding",)),
    ("embedding backward", _Rule(_embedding_backward), ("embedding_dense_backward",)),
    ("advanced indexing (gather rows)", _Rule(_index_tensor), ("index",)),
    ("gather from a buffer with padded indices", _Rule(_gather), ("gather",)),
    ("indexing by data: unsafe when padded", _Rule(_indexing_unsafe), (
        "scatter", "scatter_add", "scatter_reduce", "index_put", "index_add",
        "index_copy", "index_fill", "masked_scatter", "take", "put", "_unsafe_index",
        "_unsafe_index_put",
    )),
)
