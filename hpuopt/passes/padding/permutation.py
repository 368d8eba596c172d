"""Permutation facts: a padded dim sorted, computed on in sort order, and put back.

transformers' default routed experts (``grouped_mm_experts_forward``) sort the (token, expert)
pairs by expert id, gather the pairs' rows in that order, multiply each expert's contiguous
group of rows by that expert's weights (a grouped matmul whose group offsets count the ids) and
restore the pairs' own order with the inverse permutation::

    ids_g, perm = sort(ids)                  # ids: [B·S·K], a padded (merged) dim
    x_g, w_g = hidden[perm // K], weights[perm]
    offs = cumsum(histc(ids_g.float(), bins=E, min=0, max=E - 1))
    y_g = grouped_mm(x_g, W, offs) * w_g     # row-wise, each row with its own expert's W
    inv = empty_like(perm); inv[perm] = arange(perm.size(0))
    y = y_g[inv]                             # the pairs' order again: an ordinary padded tensor

On a padded run the sort mixes the pad pairs among the real ones, so no row of ``x_g`` sits where
the real run has it. What stays true is an identity per row: with ``P`` the permutation the sort
made *in that run*, ``x_g = U[P]`` for a tensor ``U`` that obeys the usual invariant (its real
region equals the real run's ``U``). Row-wise maths keeps the form (``f(U[P]) = f(U)[P]``); the
grouped matmul keeps it when its offsets are the cumulative counts of the same sorted ids, since
row ``i`` then falls in group ``ids[P[i]]``, its own expert; gathering by the inverse ``Q``
(``P[Q[j]] = j``) gives ``U[P][Q] = U`` back, an ordinary padded tensor. The facts
(``_Tensor.perm``, a :class:`~hpuopt.passes.padding.domain._Perm`, keyed by the sort node):

``rows``       along ``dim``, the tensor is ``U[P]`` for ``U`` = this state without the fact
               (``dims[dim]`` is the unpermuted dim's state): the sort's values, gathers by
               ``P`` (or ``P // K`` of a tensor whose rows the pairs repeat ``K`` times), row-wise
               ops on those (``permuted_rows.py``), the grouped matmul.
``index``      the values are ``P // div``: positions in the *padded* run, not the real run's.
``inverse``    the values are ``Q``: ``empty(n)[P] = arange(n)`` (an ``index_put`` or
               ``scatter`` of ``arange`` by ``P`` itself, ``n`` the padded extent).
``positions``  ``arange(n)`` with ``n`` a product of padded sizes (``perm.size(0)`` in a symbolic
               trace is ``2·B·S``): positions of the padded run, only the inverse's build reads
               them.
``counts``     ``histc`` of the sorted ids, every id in ``[0, bins)`` in a bin of its own: the
               counts per expert, pad pairs included (so they differ between the runs).
``offsets``    ``cumsum`` of those counts: ``offs[g] = #{ids <= g}``.

Every op with an operand carrying a fact comes here first (the engine asks :func:`transfer`);
what this module does not understand is unsafe, with the reason — reductions across the
permuted rows, views mixing them with other dims, a gather by a permutation of another sort,
counts of ids that might fall outside the bins, a graph output in sort order (the engine's
output check). See "Permutations" in ``docs/padding.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import node_value, packet_name
from hpuopt.passes.padding import permuted_rows
from hpuopt.passes.padding.binding import _Op
from hpuopt.passes.padding.domain import (
    ANY,
    FINITE,
    _Dim,
    _Perm,
    _same,
    _same_dim,
    _Sym,
    _Tensor,
    _Unsafe,
)
from hpuopt.passes.padding.index_facts import _holds_positions, shifted_length
from hpuopt.passes.padding.rules.indexing import _SAME_VALUES, _positions_within

aten = torch.ops.aten

ROWS, INDEX, INVERSE, POSITIONS, COUNTS, OFFSETS = (
    "rows", "index", "inverse", "positions", "counts", "offsets")
KINDS = (ROWS, INDEX, INVERSE, POSITIONS, COUNTS, OFFSETS)

Fact = tuple[str, torch.fx.Node, _Tensor]
"""An operand carrying a fact: its argument name, its node, its state."""

_GROUPED_MM = frozenset({"transformers::grouped_mm_fallback", "aten::_grouped_mm"})
_COPIES = frozenset({"clone", "alias", "detach", "contiguous", "lift_fresh_copy", "_to_copy"})
_VALUE_FREE = frozenset({"empty_like", "zeros_like", "ones_like", "full_like", "new_empty",
                         "new_zeros", "new_ones", "new_full", "new_empty_strided"})
_EXACT_INTEGERS = {torch.float64: 2**53, torch.float32: 2**24, torch.float16: 2**11,
                   torch.bfloat16: 2**8, torch.int64: 2**63, torch.int32: 2**31,
                   torch.int16: 2**15, torch.int8: 2**7, torch.uint8: 2**8}
"""Integers ``0 … n - 1`` each dtype holds exactly (a cast of ids below ``n`` keeps them)."""


def transfer(op: _Op, own_rule: Callable[[_Op], Any]) -> Any:
    """The state of ``op``'s result when it makes or reads a permutation fact, else ``None``
    (the engine applies the op's own rule). ``own_rule`` runs the op's own rule; row-wise ops
    on permuted tensors run it on the unpermuted states. Raises ``_Unsafe`` for any other op
    that sees a fact."""
    facts = _facts(op)
    packet = _packet(op)
    if not facts:
        if packet in ("sort", "argsort"):
            return _sort(op)
        return _positions(op) if packet == "arange" else None
    if op.schema.name in _GROUPED_MM:
        return _grouped_mm(op)
    handler = _HANDLERS.get(packet)
    result = handler(op, facts) if handler is not None else None
    if result is not None:
        return result
    if packet in _VALUE_FREE and all(st.perm.kind != POSITIONS for _, _, st in facts):
        with unpermuted(op, facts):
            return own_rule(op)
    if all(st.perm.kind == ROWS for _, _, st in facts):
        return permuted_rows.transfer(op, facts, own_rule)
    raise _Unsafe(why_not(op, facts), _sources(facts))


def positions_only(state: Any) -> bool:
    """Whether ``state`` is ``arange`` over a product of padded sizes: its extent is no one
    dim's (``sym_size`` of it is a padded size, but no exact one)."""
    return isinstance(state, _Tensor) and state.perm is not None and \
        state.perm.kind == POSITIONS


def output_why(k: int, state: _Tensor) -> str:
    f = state.perm
    assert f is not None
    what = {ROWS: "holds rows in the order of", INDEX: "holds the permutation of",
            INVERSE: "holds the inverse permutation of", COUNTS: "holds the counts of",
            OFFSETS: "holds the group offsets of"}.get(f.kind, "holds positions of the padded "
                                                     "run, like")
    return (f"output {k} {what} {_name(f)}: the padded run's order and counts mix pad rows with "
            "real ones, so no slice cuts it back")


def why_not(op: _Op, facts: list[Fact]) -> str:
    """The reason an op that sees a fact is refused, for the first fact's kind."""
    name = op.schema.name.split("::")[-1]
    f = facts[0][2].perm
    assert f is not None
    if f.kind == ROWS:
        return (f"{name} on rows in the order of {_name(f)} (pad rows among real ones): only "
                "row-wise ops, the grouped matmul over offsets of the same sort and the gather "
                "by its inverse permutation keep track of them")
    if f.kind in (INDEX, INVERSE):
        which = "permutation" if f.kind == INDEX else "inverse permutation"
        return (f"{name} reads the {which} of {_name(f)}, whose values are positions in the "
                "padded run: only gathers by it and the inverse permutation's build are "
                "understood")
    if f.kind == POSITIONS:
        return (f"{name} reads arange over a product of padded sizes (or a merged padded dim's "
                "extent), whose values are positions in the padded run, not the real run's: only "
                "an inverse permutation's build (inv[perm] = arange) may read them")
    return (f"{name} reads the per-group counts of the ids sorted by {_name(f)}, which count "
            "the pad rows too: only their cumulative sum and the grouped matmul over the same "
            "sort's rows are understood")


@contextlib.contextmanager
def unpermuted(op: _Op, facts: list[Fact]) -> Iterator[None]:
    """The operands' states without their facts, while the op's own rule runs: a row-wise op
    on ``U[P]`` computes ``f(U)[P]``, so its rule judges ``f(U)``."""
    states = op.an.states
    saved = {node: states[node] for _, node, _ in facts}
    for _, node, st in facts:
        states[node] = dataclasses.replace(st, perm=None, fills=(), iota=None)
    try:
        yield
    finally:
        states.update(saved)


# -- making the facts ----------------------------------------------------------------------------


def _sort(op: _Op) -> Any:
    """``sort``/``argsort`` of a 1-D tensor along its padded dim: the values are the ids in the
    sort's order (``rows``), the indices the permutation (``index``). Anything else (a padded
    dim of a wider tensor: each column its own permutation) is left to the order-statistics
    rule."""
    st = op.tensor("self")
    if op.rank("self") != 1 or st.dim(0) is None:
        return None
    op.dim_arg("dim", 1)
    d = st.dim(0)
    fact = _Perm(INDEX, op.node, 0, d, frozenset(d.sources),
                 ascending=not bool(op.raw("descending")))
    index = _Tensor((d,), FINITE, perm=fact)
    if _packet(op) == "argsort":
        return index
    return _Tensor((d,), st.pad, perm=dataclasses.replace(fact, kind=ROWS)), index


def _positions(op: _Op) -> Any:
    """``arange(n)`` from 0 in steps of 1, ``n`` a function of padded sizes that is no plain
    padded extent (the rule of ``arange`` knows those): a product of sizes, or the extent of a
    merged dim, whose real positions are no prefix — so the values at them are the padded
    run's positions, not the real run's."""
    end = op.an.state_of(op.raw("end"))
    if not (isinstance(end, _Sym) and end.deps and
            (end.exact is None or end.exact.parts is not None)) or \
            op.raw("start") not in (None, 0) or op.raw("step") not in (None, 1):
        return None
    if end.exact is None:
        length = shifted_length(op)  # a function of one padded size equal to it: that size
        if length is not None and length.parts is None:
            return None
    sources = frozenset(end.deps)
    return _Tensor((_Dim(min(sources)),), FINITE, perm=_Perm(POSITIONS, None, 0, None, sources))


def _divide(op: _Op, facts: list[Fact]) -> Any:
    """``perm // K`` (``floor_divide``, or ``div`` rounding down or toward zero: the same on
    positions) by a positive constant: positions of the rows that each repeat ``K`` times."""
    names = [a.name for a in op.schema.arguments]
    st = op.an.state_of(op.raw(names[0]))
    if len(facts) != 1 or facts[0][0] != names[0] or st.perm.kind != INDEX:
        return None
    if _packet(op) == "div" and op.raw("rounding_mode") not in ("floor", "trunc"):
        return None
    k = op.raw(names[1])
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise _Unsafe(f"divides the permutation of {_name(st.perm)} by {k!r}: only a positive "
                      "constant is understood", _sources(facts))
    return _Tensor(st.dims, FINITE, perm=dataclasses.replace(st.perm, div=st.perm.div * k))


def _copy(op: _Op, facts: list[Fact]) -> Any:
    """Copies and casts keep the permutation, its inverse, the counts and the offsets when the
    new dtype holds their values (integers: positions need a type as wide; counts and offsets
    an integer type of 32 bits or more, or a float one). Rows go through the row-wise ops."""
    st = facts[0][2]
    f = st.perm
    if f.kind == ROWS:
        return None
    if f.kind == POSITIONS:
        raise _Unsafe(why_not(op, facts), _sources(facts))
    src, out = node_value(facts[0][1]), node_value(op.node)
    if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype != out.dtype:
        if f.kind in (INDEX, INVERSE) and not _holds_positions(src.dtype, out.dtype):
            raise _Unsafe(f"casts the permutation of {_name(f)} to {out.dtype}, which may not "
                          "hold every position", _sources(facts))
        if f.kind in (COUNTS, OFFSETS) and out.dtype not in (
                torch.int32, torch.int64, torch.float32, torch.float64):
            raise _Unsafe(f"casts the counts of {_name(f)} to {out.dtype}, which may not hold "
                          "them", _sources(facts))
    return dataclasses.replace(st, fills=(), iota=None)


# -- gathers and the inverse ---------------------------------------------------------------------


def _gather(op: _Op, facts: list[Fact]) -> Any:
    """``x[idx]`` (one index tensor) or ``index_select(x, k, idx)`` where ``idx`` carries a
    fact: by the permutation (``rows`` out), by the inverse of the permutation ``x``'s rows
    follow (the unpermuted tensor out), or sorted ids into an unpadded table."""
    if _packet(op) == "index":
        indices = op.raw("indices")
        given = [k for k, t in enumerate(indices) if t is not None]
        if len(given) != 1:
            raise _Unsafe(why_not(op, facts), _sources(facts))
        k, node = given[0], indices[given[0]]
    else:
        k, node = op.dim_arg("dim", op.rank("self")), op.raw("index")
    src, idx = op.tensor("self"), op.an.state_of(node)
    kind = idx.perm.kind if isinstance(idx, _Tensor) and idx.perm is not None else None
    if len(op.an.shape_of(node)) != 1 or kind is None:
        raise _Unsafe(why_not(op, facts), _sources(facts))
    _no_size_values(op)
    if kind == INDEX and src.perm is None:
        return _by_permutation(op, src, idx, k, node)
    if kind == INVERSE:
        return _restore(op, src, idx, k, node)
    if kind == ROWS and src.perm is None and not src.padded:
        return _table_at_ids(op, idx, k, node)
    raise _Unsafe(why_not(op, [f for f in facts if f[1] is node]), _sources(facts))


def _by_permutation(op: _Op, src: _Tensor, idx: _Tensor, k: int, node: torch.fx.Node
                    ) -> _Tensor:
    """``x[P // K]``: rows ``U[P]`` where ``U`` repeats each row of ``x`` ``K`` times, which must
    be laid out like the sorted dim (the pairs of ``K`` routed experts per token)."""
    f = idx.perm
    d = src.dim(k)
    repeated = None if d is None else _repeat(d, f.div)
    extent_ok = _same(op.shape("self")[k] * f.div, op.an.shape_of(node)[0])
    if repeated is None or not extent_ok or not _same_dim(repeated, f.base):
        per = f" repeated {f.div} times" if f.div != 1 else ""
        raise _Unsafe(f"gathers dim {k} at the permutation of {_name(f)}, but that dim{per} is "
                      "not laid out like the sorted one (the permutation's values are positions "
                      "of the padded run)", f.sources | _dim_sources(d))
    op.an.tie_dims(repeated, f.base)
    dims = list(src.dims or (None,) * op.rank("self"))
    dims[k] = f.base
    return _Tensor(tuple(dims), src.pad if src.padded else FINITE,
                   perm=dataclasses.replace(f, kind=ROWS, dim=k, div=1))


def _restore(op: _Op, src: _Tensor, idx: _Tensor, k: int, node: torch.fx.Node) -> _Tensor:
    """``y[Q]`` with ``Q`` the inverse of the permutation ``P`` that ``y``'s rows follow along
    ``k``: ``U[P][Q] = U``, an ordinary padded tensor again."""
    f, g = idx.perm, src.perm
    if g is None or g.kind != ROWS or g.key is not f.key or g.dim != k or \
            not _same_dim(g.base, f.base) or \
            not _same(op.shape("self")[k], op.an.shape_of(node)[0]):
        raise _Unsafe(f"gathers by the inverse permutation of {_name(f)} a tensor whose dim {k} "
                      "does not hold rows in that sort's order", f.sources)
    op.an.tie_dims(g.base, f.base)
    return _Tensor(src.dims, src.pad)


def _table_at_ids(op: _Op, idx: _Tensor, k: int, node: torch.fx.Node) -> _Tensor:
    """``table[ids_g]`` with ``ids_g`` the sort's own values (a per-expert bias): ``U[P]`` for
    ``U = table[ids]``, when the ids are positions in the table's range in any run."""
    f = idx.perm
    key = f.key
    while isinstance(node, torch.fx.Node) and packet_name(node) in _SAME_VALUES:
        node = node.args[0]
    bound = op.shape("self")[k]
    _values_unchanged(op, f)
    if not (isinstance(node, torch.fx.Node) and node.target is operator.getitem and
            node.args == (key, 0) and _packet_of(key) == "sort" and
            _positions_within(op, key.args[0], bound)):
        raise _Unsafe(f"indexes a table with values in the order of {_name(f)} that are not "
                      "provably positions in its range", f.sources)
    dims: list[_Dim | None] = [None] * op.rank("self")
    dims[k] = f.base
    return _Tensor(tuple(dims), FINITE, perm=dataclasses.replace(f, kind=ROWS, dim=k))


def _inverse(op: _Op, facts: list[Fact]) -> Any:
    """``inv[P] = arange(n)`` (``index_put``, not accumulating) or ``inv.scatter(0, P,
    arange(n))``: every position written once, ``inv[P[i]] = i``, so ``P[inv[j]] = j``."""
    packet = _packet(op)
    if packet in ("scatter", "scatter_"):
        if op.raw("src") is None or op.raw("reduce") is not None or \
                op.dim_arg("dim", op.rank("self")) != 0:
            raise _Unsafe(why_not(op, facts), _sources(facts))
        node, values = op.raw("index"), op.raw("src")
    else:
        indices = op.raw("indices")
        if len(indices) != 1 or indices[0] is None or op.raw("accumulate"):
            raise _Unsafe(why_not(op, facts), _sources(facts))
        node, values = indices[0], op.raw("values")
    idx = op.an.state_of(node)
    f = idx.perm if isinstance(idx, _Tensor) else None
    if f is None or f.kind != INDEX or f.div != 1:
        raise _Unsafe(why_not(op, facts), _sources(facts))
    _no_size_values(op)
    n = op.an.shape_of(node)[0]
    dest = op.tensor("self")
    if op.rank("self") != 1 or dest.perm is not None and dest.perm.kind == POSITIONS or \
            dest.dim(0) is None or not _same_dim(dest.dim(0), f.base) or \
            not _same(op.shape("self")[0], n) or not _counts_up(op, values, n, f.base):
        raise _Unsafe(f"writes at the permutation of {_name(f)} something other than arange "
                      "over its whole length into a buffer of that length: not its inverse",
                      f.sources)
    return _Tensor((f.base,), FINITE, perm=dataclasses.replace(f, kind=INVERSE))


def _counts_up(op: _Op, node: Any, n: Any, base: _Dim) -> bool:
    """``node`` is ``arange(n)`` (integers) over the padded extent: over a product of padded
    sizes, or over the sorted dim's own size. Its length traced equal to ``n`` follows the
    padding as ``n`` does (a length that did not would not even write)."""
    if not (isinstance(node, torch.fx.Node) and _packet_of(node) == "arange"):
        return False
    val, st = node_value(node), op.an.state_of(node)
    if op.an.pad_facts_stale or not isinstance(val, torch.Tensor) or \
            val.dtype.is_floating_point or \
            val.dtype == torch.bool or val.dim() != 1 or not _same(val.shape[0], n):
        return False
    if positions_only(st):
        return True
    return isinstance(st, _Tensor) and st.iota == 0 and st.dim(0) is not None and \
        _same_dim(st.dim(0), base)


# -- counts, offsets and the grouped matmul ------------------------------------------------------


def _counts(op: _Op, facts: list[Fact]) -> Any:
    """``histc`` of the sorted ids (through exact casts), each id in ``[0, bins)`` in a bin of
    its own: the ids are positions of a ``topk``/``sort``... over at most ``bins`` columns
    (``_positions_within``), and ``min``, ``max`` put integer ``k`` in bin ``k`` with room to
    spare on both sides (or exactly on ``min``, or on ``max``, which the kernels put in the
    last bin)."""
    st = op.tensor("self")
    f = st.perm
    bins, lo, hi = op.raw("bins"), op.raw("min"), op.raw("max")
    if f is None or f.kind != ROWS or len(facts) != 1 or op.rank("self") != 1:
        raise _Unsafe(why_not(op, facts), _sources(facts))
    key = f.key
    _values_unchanged(op, f)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
    if not (isinstance(bins, int) and bins >= 1 and numbers and _packet_of(key) == "sort" and
            _exact_ids(op.raw("self"), key, bins) and
            _positions_within(op, key.args[0], bins)):
        raise _Unsafe(f"histc of values in the order of {_name(f)} that are not provably ids "
                      f"in [0, {bins}) (positions of a topk or sort over at most that many)",
                      f.sources)
    if not _bins_are_ids(bins, lo, hi):
        raise _Unsafe(f"histc(bins={bins}, min={lo}, max={hi}) does not count each id in "
                      f"[0, {bins}) in a bin of its own", f.sources)
    return _Tensor((None,), FINITE, perm=dataclasses.replace(f, kind=COUNTS, dim=None))


def _exact_ids(node: Any, key: torch.fx.Node, bound: int) -> bool:
    """``node`` is the sort's values through copies and casts that hold ``0 … bound - 1``."""
    for _ in range(16):
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return False
        if node.target is operator.getitem:
            return node.args == (key, 0)
        if _packet_of(node) not in _COPIES and \
                node.target is not torch.ops.prims.convert_element_type.default:
            return False
        val = node_value(node)
        if not isinstance(val, torch.Tensor) or _EXACT_INTEGERS.get(val.dtype, 0) < bound:
            return False
        node = node.args[0]
    return False


def _bins_are_ids(bins: int, lo: float, hi: float) -> bool:
    """Whether ``histc(x, bins, lo, hi)`` puts every integer ``k`` in ``[0, bins)`` in bin ``k``,
    in exact arithmetic with a margin far above float rounding: bin ``j`` is ``[lo + j·w,
    lo + (j + 1)·w)``, ``w = (hi - lo) / bins``, and ``hi`` itself falls in the last bin."""
    low, high = Fraction(lo), Fraction(hi)
    if not low < high:
        return False
    width = (high - low) / bins
    margin = width / 1000 + (abs(low) + abs(high) + 1) / 10**6
    for k in range(bins):
        if k == high:
            if k != bins - 1:
                return False
            continue
        left, right = low + k * width, low + (k + 1) * width
        if not (k == low or left + margin <= k) or not k + margin <= right:
            return False
    return True


def _offsets(op: _Op, facts: list[Fact]) -> Any:
    """``cumsum`` of the counts along their one dim, to an integer type: ``offs[g]`` is the
    number of ids ``<= g``. A scan of rows goes through the row-wise ops."""
    st = op.tensor("self")
    f = st.perm
    if f.kind == ROWS:
        return None
    out = node_value(op.node)
    if f.kind != COUNTS or op.dim_arg("dim", 1) != 0 or not isinstance(out, torch.Tensor) or \
            out.dtype.is_floating_point:
        raise _Unsafe(why_not(op, facts), _sources(facts))
    return _Tensor((None,), FINITE, perm=dataclasses.replace(f, kind=OFFSETS))


def _grouped_mm(op: _Op) -> _Tensor:
    """``grouped_mm(x_g, W, offs)`` (transformers' fallback, or ``aten._grouped_mm`` with a 2-D
    ``x`` and 3-D ``W``): row ``i`` is multiplied by ``W[g]`` for the group ``g`` the offsets
    give it, which is ``ids_g[i]`` when the offsets are the cumulative counts of the same
    ascending sort's ids; so ``grouped_mm(U[P], W, offs) = V[P]`` with ``V[j] = U[j] @
    W[ids[j]]``, row-wise in the unpermuted order, whatever the pad pairs' ids."""
    names = [a.name for a in op.schema.arguments]
    x, w, offs = op.tensor(names[0]), op.tensor(names[1]), op.tensor("offs")
    f, g = x.perm, offs.perm
    sources = frozenset(f.sources if f is not None else ()) | (g.sources if g else frozenset())
    if f is None or f.kind != ROWS or f.dim != 0 or op.rank(names[0]) != 2 or \
            x.dim(1) is not None:
        raise _Unsafe("grouped matmul whose rows are not in a sort's order along dim 0 (or whose "
                      "contracted dim is padded)", sources or None)
    if g is None or g.kind != OFFSETS or g.key is not f.key:
        raise _Unsafe(f"grouped matmul of rows in the order of {_name(f)} with offsets that are "
                      "not the cumulative counts of that sort's ids", sources)
    if not f.ascending:
        raise _Unsafe(f"grouped matmul over a descending sort ({_name(f)}): its groups run from "
                      "the last id down, the offsets from the first up", sources)
    bias = op.tensor("bias") if "bias" in op.values else _Tensor(None)
    if w.padded or w.perm is not None or op.rank(names[1]) != 3 or bias.padded or \
            bias.perm is not None or not _same(op.shape(names[1])[0], op.shape("offs")[0]):
        raise _Unsafe("grouped matmul with padded weights, or one group per offset not given",
                      sources)
    _no_size_values(op)
    return _Tensor((f.base, None), FINITE if x.pad <= FINITE else ANY,
                   perm=dataclasses.replace(f, dim=0))


# -- helpers -------------------------------------------------------------------------------------


def _facts(op: _Op) -> list[Fact]:
    out: list[Fact] = []
    for name, value in op.values.items():
        for node in value if isinstance(value, (list, tuple)) else (value,):
            st = op.an.state_of(node) if isinstance(node, torch.fx.Node) else None
            if isinstance(st, _Tensor) and st.perm is not None:
                out.append((name, node, st))
    return out


def _sources(facts: list[Fact]) -> frozenset[Any]:
    out: set[Any] = set()
    for _, _, st in facts:
        out |= st.perm.sources
        out |= {s for d in st.dims or () if d is not None for s in d.sources}
    return frozenset(out)


def _dim_sources(d: _Dim | None) -> frozenset[Any]:
    return frozenset(d.sources) if d is not None else frozenset()


def _repeat(d: _Dim, k: int) -> _Dim:
    """The state of a dim whose positions each repeat ``k`` times (``[n, k] -> [n·k]``)."""
    if k == 1:
        return d
    if d.parts is not None:
        return _Dim.merged(d.parts + ((None, k),))
    return _Dim(d.source, d.factor * k, d.offset * k)


def _values_unchanged(op: _Op, f: _Perm) -> None:
    """The proofs that read values through the graph's structure (ids that are a ``topk``'s
    positions, the sort's values behind casts) hold only while nothing wrote into a padded
    tensor in place: after such a write, a node may no longer hold what made it."""
    if op.an.pad_facts_stale:
        raise _Unsafe(f"reads the ids {_name(f)} sorted, but an earlier in-place write into a "
                      "padded tensor may have changed them", f.sources)


def _no_size_values(op: _Op) -> None:
    for arg in op.schema.arguments:
        st = op.state(arg.name)
        for s in st if isinstance(st, tuple) else (st,):
            if isinstance(s, _Sym) and s.deps:
                raise _Unsafe(f"reads the padded size as a value (argument {arg.name!r}): the "
                              "padded run would see the bucket size", s.deps)


def _name(f: _Perm) -> str:
    return f"the sort at `{f.key.name}`" if isinstance(f.key, torch.fx.Node) else "a sort"


def _packet(op: _Op) -> str:
    return getattr(getattr(op.target, "overloadpacket", None), "__name__", "")


def _packet_of(node: Any) -> str:
    return packet_name(node) if isinstance(node, torch.fx.Node) else ""


_HANDLERS: dict[str, Callable[[_Op, list[Fact]], Any]] = {
    "index": _gather, "index_select": _gather, "index_put": _inverse, "index_put_": _inverse,
    "_unsafe_index_put": _inverse, "scatter": _inverse, "scatter_": _inverse, "histc": _counts,
    "cumsum": _offsets, "floor_divide": _divide, "div": _divide,
    **{name: _copy for name in _COPIES},
}
