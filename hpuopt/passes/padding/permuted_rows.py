"""Row-wise ops on rows in a sort's order (the ``rows`` fact of ``permutation.py``).

A tensor ``T = U[P]`` along dim ``p`` (``P`` the permutation a sort made of a padded dim, ``U``
an ordinary padded tensor) stays of that form under every op that treats the positions along
``p`` alike and keeps ``p`` whole: ``f(U[P]) = f(U)[P]``. So the op's own rule judges ``f(U)``
(on the operands' states without the fact), and the result gets the fact back on the dim ``p``
went to. The ops, by what they do to ``p``:

- elementwise maths (the pointwise and positivity families, ops tagged pointwise), where every
  operand is either in the same sort's order along the same dim or broadcasts along it (extent 1
  or absent): a padded operand in its own order there would meet ``U[P]`` row by row, not ``U``;
- views that keep ``p`` as one dim of the same extent, dim shuffles, ``expand``;
- ops along *other* dims: ``split``/``slice``/``select``…, softmax, scans, ``sort``/``topk``,
  reductions and norms over them;
- ``mm``/``addmm`` with the permuted tensor as the rows operand;

Every other op, and these along ``p`` itself (a sum across the permuted rows mixes pad pairs
into real ones), is unsafe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from hpuopt.passes.padding.binding import _Op
from hpuopt.passes.padding.domain import _same, _same_dim, _Tensor, _Unsafe
from hpuopt.passes.padding.rules import pointwise, positive
from hpuopt.passes.padding.rules.views import _group_dims, dim_order
from hpuopt.passes.padding.table import _lookup

if TYPE_CHECKING:
    from hpuopt.passes.padding.permutation import Fact

aten = torch.ops.aten

_ELEMENTWISE = frozenset(
    name for family in (pointwise, positive) for _, _, names in family.ROWS for name in names
) - {"tril", "triu"}
_RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "view_copy", "unsqueeze", "squeeze",
                       "flatten", "unflatten", "_reshape_alias", "squeeze_copy",
                       "unsqueeze_copy"})
_SHUFFLES = frozenset({"permute", "transpose", "t", "permute_copy", "transpose_copy", "t_copy"})
_KEEPS_DIM = frozenset({"split", "split_with_sizes", "split_copy", "split_with_sizes_copy",
                        "slice", "slice_copy", "narrow", "_softmax", "softmax", "_log_softmax",
                        "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin",
                        "sort", "argsort", "topk"})
"""Ops along one other dim that keep every dim, ``p`` in place."""
_DROPS_DIM = frozenset({"select", "select_copy", "unbind", "unbind_copy"})
_REDUCTIONS = frozenset({"sum", "nansum", "mean", "amax", "amin", "prod", "var", "std",
                         "var_mean", "std_mean", "linalg_vector_norm", "norm", "logsumexp",
                         "any", "all", "argmax", "argmin", "max", "min"})
_NORMS = frozenset({"native_layer_norm", "_fused_rms_norm"})


def transfer(op: _Op, facts: Sequence[Fact], own_rule: Callable[[_Op], Any]) -> Any:
    """The result of a row-wise op on operands in one sort's order (see the module doc);
    ``_Unsafe`` for any other op."""
    from hpuopt.passes.padding import permutation

    first = facts[0][2].perm
    assert first is not None
    if any(st.perm.key is not first.key for _, _, st in facts):
        raise _Unsafe(f"{_name(op)} meets rows in the orders of two different sorts",
                      permutation._sources(list(facts)))
    dest = _destination(op, facts)
    if dest is None:
        raise _Unsafe(permutation.why_not(op, list(facts)), permutation._sources(list(facts)))
    with permutation.unpermuted(op, list(facts)):
        result = own_rule(op)
    return _mark(op, result, dest, facts)


def _mark(op: _Op, result: Any, dest: int, facts: Sequence[Fact]) -> Any:
    if isinstance(result, tuple):
        return tuple(_mark(op, r, dest, facts) for r in result)
    if not isinstance(result, _Tensor):
        return result
    f = facts[0][2].perm
    d = result.dim(dest)
    if d is None or not _same_dim(d, f.base):
        raise _Unsafe(f"{_name(op)} does not keep the dim whose rows a sort permuted as it was",
                      set(f.sources))
    return dataclasses.replace(result, perm=dataclasses.replace(f, dim=dest), fills=(),
                               iota=None)


def _destination(op: _Op, facts: Sequence[Fact]) -> int | None:
    """The result dim the permuted dim goes to, or ``None`` when the op is not row-wise."""
    packet = _packet(op)
    name, _, st = facts[0]
    p = st.perm.dim
    rank = op.rank(name)
    if _elementwise(op, packet):
        return _broadcast_dest(op, facts)
    if packet in _RESHAPES:
        return _reshape_dest(op, name, p)
    if packet in _SHUFFLES and name == "self":
        return _shuffle_dest(op, p, rank)
    if packet in ("expand", "expand_copy") and name == "self":
        return p + len(op.raw("size")) - rank
    if packet in _KEEPS_DIM | _DROPS_DIM and name == "self" and len(facts) == 1:
        along = op.dim_arg("dim", rank) if op.raw("dim") is not None else None
        if along is None or along == p:
            return None
        return p - (1 if packet in _DROPS_DIM and along < p else 0)
    if packet in _REDUCTIONS and name == "self" and len(facts) == 1:
        return _reduction_dest(op, p, rank)
    if packet in _NORMS and name == "input" and len(facts) == 1:
        return p if p < rank - len(op.raw("normalized_shape")) else None
    if packet in ("mm", "addmm") and name in ("self", "mat1") and p == 0:
        return _rows_operand_dest(op, facts, "self" if packet == "mm" else "mat1")
    return None


def _elementwise(op: _Op, packet: str) -> bool:
    if op.target in (aten.max.other, aten.min.other):
        return True
    base = packet[:-1] if packet.endswith("_") and packet[:-1] in _ELEMENTWISE else packet
    if base in _ELEMENTWISE:
        return True
    return _lookup(op.target) is None and torch.Tag.pointwise in op.target.tags


def _broadcast_dest(op: _Op, facts: Sequence[Fact]) -> int | None:
    """Elementwise: every operand in the sort's order lines up on one result dim (and the
    same unpermuted layout), every other operand broadcasts along it."""
    out_rank = len(op.out_shape())
    dests = set()
    for name, node, st in facts:
        dests.add(st.perm.dim + out_rank - len(op.an.shape_of(node)))
        if not _same_dim(st.perm.base, facts[0][2].perm.base):
            return None
    if len(dests) != 1:
        return None
    dest = dests.pop()
    permuted = {node for _, node, _ in facts}
    for value in op.values.values():
        for node in value if isinstance(value, (list, tuple)) else (value,):
            if not isinstance(node, torch.fx.Node) or node in permuted:
                continue
            shape = op.an.shape_of(node)
            i = dest - (out_rank - len(shape))
            st = op.an.state_of(node)
            if i >= 0 and (not _same(shape[i], 1) or isinstance(st, _Tensor) and
                           st.dim(i) is not None):
                raise _Unsafe(f"{_name(op)} meets rows in a sort's order with an operand in its "
                              f"own order along dim {dest} (row i of one is not row i of the "
                              "other)", set(facts[0][2].perm.sources))
    return dest


def _reshape_dest(op: _Op, name: str, p: int) -> int | None:
    """A reshape keeps the permuted dim when it is a group of its own, one output dim of the
    same extent."""
    in_shape, out_shape = op.shape(name), op.out_shape()
    for ga, gb in _group_dims(in_shape, out_shape):
        if p in ga:
            if len(ga) == 1 and len(gb) == 1 and _same(in_shape[p], out_shape[gb[0]]):
                return gb[0]
            return None
    return None


def _shuffle_dest(op: _Op, p: int, rank: int) -> int | None:
    return dim_order(op, rank).index(p)


def _reduction_dest(op: _Op, p: int, rank: int) -> int | None:
    if op.target in (aten.max.default, aten.min.default) or "dim" not in op.values:
        return None
    dims = op.dims_arg("dim", rank)
    if p in dims:
        return None
    return p if op.raw("keepdim") else p - sum(1 for d in dims if d < p)


def _rows_operand_dest(op: _Op, facts: Sequence[Fact], rows: str) -> int | None:
    """``mm(T, W)``/``addmm(b, T, W)``: rows of ``T`` in the sort's order give rows of the
    product in it; ``W`` holds no fact, a bias broadcasts along the rows or is in that order
    too."""
    if all(name != rows for name, _, _ in facts):
        return None
    for name, _, st in facts:
        if name != rows and (name != "self" or op.rank("self") != 2 or st.perm.dim != 0):
            return None
    bias = op.tensor("self") if rows == "mat1" else None
    if bias is not None and bias.perm is None and op.rank("self") == 2 and \
            not _same(op.shape("self")[0], 1):
        return None
    return 0


def _packet(op: _Op) -> str:
    return getattr(getattr(op.target, "overloadpacket", None), "__name__", "")


def _name(op: _Op) -> str:
    return op.schema.name.split("::")[-1]
