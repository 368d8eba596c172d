"""Transfer rules of ops that move positions: views and reshapes, dim shuffles, ``expand``,
``slice``/``select``/``split``, ``flip``/``roll``, ``cat``/``stack``, ``constant_pad_nd`` and
``repeat``.

A reshape keeps the padded dim only as the outermost dim of a group of merged dims, with the
product of the others as its ``factor``; a ``cat`` keeps it only when the padded operand comes
last (its real region then starts at an ``offset``). Rules 3 to 6 of ``docs/padding.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hpuopt.passes.padding.binding import _SHAPE, Row, RuleFn, _multi, _Op, _Rule
from hpuopt.passes.padding.domain import (
    ANY,
    FINITE,
    _Dim,
    _literal_pad,
    _prod,
    _same,
    _same_dim,
    _Sym,
    _Tensor,
    _Unsafe,
)
from hpuopt.passes.padding.rules.shapes import _size_arg_dim

aten = torch.ops.aten

# -- views and reshapes ---------------------------------------------------------------------------


def _group_dims(a: Sequence[Any], b: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    """Smallest groups of non-1 dims of ``a`` and ``b`` with equal products (a reshape's groups)."""
    ia = [i for i, s in enumerate(a) if not _same(s, 1)]
    ib = [i for i, s in enumerate(b) if not _same(s, 1)]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while not _same(pa, pb):
            if statically_known_true(pb % pa == 0) and i < len(ia):
                ga.append(ia[i])
                pa = pa * a[ia[i]]
                i += 1
            elif j < len(ib):
                gb.append(ib[j])
                pb = pb * b[ib[j]]
                j += 1
            elif i < len(ia):
                ga.append(ia[i])
                pa = pa * a[ia[i]]
                i += 1
            else:
                raise _Unsafe("cannot match the dims of the reshape (sizes not provably equal)")
        groups.append((ga, gb))
    if i < len(ia) or j < len(ib):
        raise _Unsafe("cannot match the dims of the reshape (sizes not provably equal)")
    return groups


def _reshape(op: _Op) -> _Tensor:
    st = op.tensor("self")
    in_shape, out_shape = op.shape("self"), op.out_shape()
    dims: list[_Dim | None] = [None] * len(out_shape)
    for ga, gb in _group_dims(in_shape, out_shape):
        states = [st.dim(i) for i in ga]
        head = states[0]
        if any(s is not None and s.parts is not None for s in states):
            _split_merged(states, ga, gb, in_shape, out_shape, dims)
            continue
        if any(s is not None for s in states[1:]):
            dims[_merge_target(states, gb, out_shape)] = _Dim.merged(
                tuple((s, in_shape[i]) for s, i in zip(states, ga)))
            continue
        if head is None:
            continue
        rest = _prod(in_shape[i] for i in ga[1:])
        inner = _prod(out_shape[i] for i in gb[1:])
        # Real prefix of the merged group: (n·factor + offset)·rest positions. Output rows hold
        # `inner` positions each, so the prefix is whole rows for every n iff `inner` divides
        # both factor·rest and offset·rest.
        factor, offset = head.factor * rest, head.offset * rest
        if not (statically_known_true(factor % inner == 0)
                and statically_known_true(offset % inner == 0)):
            raise _Unsafe(f"reshape splits the padded {head.source} across output dims "
                          f"{gb}: a source position would be cut", {head.source})
        if not _same(inner, 1):
            factor, offset = factor // inner, offset // inner
        dims[gb[0]] = _Dim(head.source, factor, offset)
    _check_size_args(op, dims, "size" if "size" in op.values else "shape")
    return _Tensor(tuple(dims), st.pad)


def _merge_target(states: Sequence[_Dim | None], gb: Sequence[int], out_shape: Sequence[Any]
                  ) -> int:
    """The output dim a group with a padded inner dim merges into (``[B, S] -> [B*S]``)."""
    big = [j for j in gb if not _same(out_shape[j], 1)]
    if len(big) != 1:
        raise _Unsafe("reshape regroups padded dims across several output dims",
                      {x for s in states if s is not None for x in s.sources})
    for s in states:
        if s is not None and (s.shifted or not _same(s.factor, 1) or s.parts is not None):
            raise _Unsafe("reshape merges a padded dim whose extent is scaled or shifted",
                          set(s.sources))
    return big[0]


def _split_merged(states: Sequence[_Dim | None], ga: Sequence[int], gb: Sequence[int],
                  in_shape: Sequence[Any], out_shape: Sequence[Any],
                  dims: list[_Dim | None]) -> None:
    """A merged dim kept whole, merged further with unpadded inner dims (``[B*S, K] ->
    [B*S*K]``: a routed token's K copies), or split back along its parts' boundaries (into its
    own dims, or into groups of them: ``[B*S*K] -> [B*S, K]``)."""
    merged = states[0]
    big = [j for j in gb if not _same(out_shape[j], 1)]
    if len(ga) > 1 and merged is not None and merged.parts is not None and len(big) == 1 \
            and all(s is None for s in states[1:]):
        dims[big[0]] = _Dim.merged(merged.parts + tuple((None, in_shape[i]) for i in ga[1:]))
        return
    if len(ga) != 1 or merged is None or merged.parts is None:
        raise _Unsafe("reshape merges a merged padded dim with other dims",
                      {x for s in states if s is not None for x in s.sources})
    if len(big) == 1 and _same(out_shape[big[0]], in_shape[ga[0]]):
        dims[big[0]] = merged
        return
    parts = [(d, n) for d, n in merged.parts if not _same(n, 1)]
    groups = _part_groups(parts, [out_shape[j] for j in big])
    if groups is None:
        raise _Unsafe("reshape splits merged padded dims other than along their boundaries",
                      set(merged.sources))
    for j, group in zip(big, groups):
        if len(group) == 1:
            dims[j] = group[0][0]
        elif any(d is not None for d, _ in group):
            dims[j] = _Dim.merged(tuple(group))


def _part_groups(parts: Sequence[tuple[_Dim | None, Any]], sizes: Sequence[Any]
                 ) -> list[list[tuple[_Dim | None, Any]]] | None:
    """``parts`` cut into consecutive groups whose extents multiply to ``sizes`` in order, or
    ``None`` when an output dim would cut through a part."""
    groups: list[list[tuple[_Dim | None, Any]]] = []
    k = 0
    for size in sizes:
        group: list[tuple[_Dim | None, Any]] = []
        product: Any = 1
        while k < len(parts) and not _same(product, size):
            group.append(parts[k])
            product = product * parts[k][1]
            k += 1
        if not group or not _same(product, size):
            return None
        groups.append(group)
    return groups if k == len(parts) else None


def _check_size_args(op: _Op, dims: Sequence[_Dim | None], name: str) -> None:
    """A padded output dim's size argument must follow the padded size (``-1`` or symbolic)."""
    sizes = op.raw(name)
    if not isinstance(sizes, (list, tuple)) or len(sizes) != len(dims):
        return
    for j, (size, d) in enumerate(zip(sizes, dims)):
        st = op.an.state_of(size)
        deps = st.deps if isinstance(st, _Sym) else frozenset()
        if d is not None and isinstance(size, int) and size != -1:
            raise _Unsafe(f"size argument {j} bakes the traced extent {size} of the padded "
                          f"{d.source} into the graph", {d.source})
        if d is not None and isinstance(size, torch.fx.Node):
            if not deps:  # a size of its own (another input): it stays at its real value
                raise _Unsafe(f"size argument {j} ({size.name}) does not follow the padded "
                              f"extent of {d.source}: it keeps its real value while the tensor "
                              "is padded", {d.source})
            if st.exact is not None and _same_dim(st.exact, d):
                op.an.tie_dims(st.exact, d)
        if d is None and deps:
            raise _Unsafe(f"size argument {j} depends on the padded size but the dim does not "
                          "carry it", deps)


def _view_dtype(op: _Op) -> _Tensor:
    st = op.tensor("self")
    if st.dim(len(op.shape("self")) - 1) is not None:
        raise _Unsafe("view as another dtype reinterprets the padded last dim")
    return _Tensor(st.dims, ANY)


def dim_order(op: _Op, rank: int) -> list[int]:
    """The input dim each output dim of a ``t``, ``permute`` or ``transpose`` comes from."""
    if op.schema.name.split("::")[-1] in ("t", "t_copy"):
        return list(range(rank))[::-1]
    if "dims" in op.values:
        return [d % rank for d in op.raw("dims")]
    order = list(range(rank))
    a, b = op.dim_arg("dim0", rank), op.dim_arg("dim1", rank)
    order[a], order[b] = order[b], order[a]
    return order


def _permute(op: _Op) -> _Tensor:
    st = op.tensor("self")
    order = dim_order(op, op.rank("self"))
    return _Tensor(tuple(st.dim(i) for i in order), st.pad)


def _expand(op: _Op) -> _Tensor:
    st = op.tensor("self")
    in_shape, sizes = op.shape("self"), op.raw("size")
    rank = len(sizes)
    dims: list[_Dim | None] = []
    for j, size in enumerate(sizes):
        i = j - (rank - len(in_shape))
        cur = st.dim(i) if i >= 0 else None
        if cur is not None:
            if isinstance(size, int) and size != -1:
                raise _Unsafe(f"expand size {j} bakes the traced extent {size} of the padded "
                              f"{cur.source}")
            dims.append(cur)
            continue
        if i >= 0 and not _same(in_shape[i], 1):
            if isinstance(op.an.state_of(size), _Sym) and op.an.state_of(size).deps:
                raise _Unsafe(f"expand size {j} depends on the padded size")
            dims.append(None)
            continue
        dims.append(_size_arg_dim(op, size, f"expand size {j}"))
    return _Tensor(tuple(dims), st.pad if st.padded else FINITE)


# -- indexing along a dim -------------------------------------------------------------------------

_OPEN_END = 2**62


def _slice(op: _Op) -> _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    d = st.dim(dim)
    start, end, step = op.raw("start"), op.raw("end"), op.raw("step")
    dims = list(st.dims or (None,) * rank)
    if d is None:
        end_st = op.an.state_of(end)
        if (start in (None, 0) and step == 1 and isinstance(end_st, _Sym)
                and end_st.exact is not None and op.an.param_content(op.raw("self"))):
            # A buffer cut to the padded length (BERT's position ids): its pad holds the
            # buffer's next values; the buffer must be long enough (checked per bucket).
            op.an.require_check(op.node, "extent", dim)
            dims[dim] = end_st.exact
            return _Tensor(tuple(dims), st.pad if st.padded else FINITE)
        for name in ("start", "end", "step"):
            s = op.state(name)
            if isinstance(s, _Sym) and s.deps:
                raise _Unsafe(f"slice {name} on an unpadded dim depends on the padded size", s.deps)
        return _Tensor(tuple(dims) if st.padded else None, st.pad if st.padded else FINITE)
    end_st = op.an.state_of(end)
    whole_end = (end is None or (isinstance(end, int) and end >= _OPEN_END)
                 or (isinstance(end_st, _Sym) and end_st.exact is not None
                     and end_st.exact.source == d.source and _same_dim(end_st.exact, d)))
    if start in (None, 0) and step == 1 and whole_end:
        return _Tensor(tuple(dims), st.pad)
    extent = op.shape("self")[dim]
    if (isinstance(start, int) and isinstance(end, int) and isinstance(step, int)
            and 0 <= start <= end and step > 0 and statically_known_true(end <= extent)):
        dims[dim] = None  # stays inside the traced real region (this graph was traced at n ≥ end)
        return _Tensor(tuple(dims), st.pad)
    raise _Unsafe(f"slice along the padded dim {dim} (start={start}, end={end}, step={step}) "
                  "cuts or shifts the pad region", {d.source})


def _select(op: _Op) -> _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    index = op.raw("index")
    dims = list(st.dims or (None,) * rank)
    if dims[dim] is not None and not (isinstance(index, int) and index >= 0):
        raise _Unsafe(f"select along the padded dim {dim} with index {index!r}: a negative index "
                      "counts from the end, which is the pad", {dims[dim].source})
    del dims[dim]
    return _Tensor(tuple(dims), st.pad)


def _split(op: _Op) -> tuple[_Tensor, ...] | _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    if st.dim(dim) is not None:
        raise _Unsafe(f"{op.schema.name} along the padded dim {dim}", {st.dim(dim).source})
    count = _multi(op)
    if op.target is aten.unbind.int:
        dims = list(st.dims or (None,) * rank)
        del dims[dim]
        return tuple(_Tensor(tuple(dims), st.pad) for _ in range(count))
    return tuple(_Tensor(st.dims, st.pad) for _ in range(count))


def _along_dims_unsafe(arg: str, what: str) -> RuleFn:
    """Ops that move positions along the given dims (flip, roll): unsafe when a dim is padded."""

    def rule(op: _Op) -> _Tensor:
        st = op.tensor("self")
        rank = op.rank("self")
        dims = op.dims_arg(arg, rank)
        bad = [d for d in dims if st.dim(d) is not None]
        if bad:
            raise _Unsafe(f"{what} along the padded dim {bad[0]}", {st.dim(bad[0]).source})
        return _Tensor(st.dims, st.pad)

    return rule


# -- concatenation, padding, tiling ---------------------------------------------------------------


def _cat(op: _Op) -> _Tensor:
    names = op.raw("tensors")
    states = [op.an.state_of(t) for t in names]
    shapes = [op.an.shape_of(t) for t in names]
    out_shape = op.out_shape()
    rank = len(out_shape)
    dim = op.raw("dim") % rank
    dims: list[_Dim | None] = [None] * rank
    for j in range(rank):
        entries = [(s.dim(j) if isinstance(s, _Tensor) and len(sh) == rank else None, sh)
                   for s, sh in zip(states, shapes) if len(sh) == rank]
        if j == dim:
            padded = [k for k, (d, _) in enumerate(entries) if d is not None]
            if not padded:
                continue
            last = len(entries) - 1
            if padded != [last]:
                raise _Unsafe(f"cat along the padded dim {dim}: the pad lands in the middle of "
                              "the result (only a padded *last* operand is safe)")
            head = entries[last][0]
            assert head is not None
            prefix: Any = 0
            for _, sh in entries[:-1]:
                prefix = prefix + sh[dim]
            dims[j] = _Dim(head.source, head.factor, head.offset + prefix)
            continue
        for d, sh in entries:
            if d is None:
                continue
            if dims[j] is None:
                dims[j] = d
            elif not _same_dim(dims[j], d):  # type: ignore[arg-type]
                raise _Unsafe(f"cat operands carry the padded extent differently on dim {j}")
            else:
                op.an.tie_dims(dims[j], d)  # type: ignore[arg-type]
        if dims[j] is not None and any(d is None for d, _ in entries):
            raise _Unsafe(f"cat: padded dim {j} meets an unpadded operand of the same extent")
    pads = [s.pad for s in states if isinstance(s, _Tensor) and s.padded]
    return _Tensor(tuple(dims), max(pads) if pads else FINITE)


def _stack(op: _Op) -> _Tensor:
    names = op.raw("tensors")
    states = [op.an.state_of(t) for t in names]
    rank = len(op.out_shape())
    dim = op.raw("dim") % rank
    in_rank = rank - 1
    dims: list[_Dim | None] = [None] * in_rank
    for j in range(in_rank):
        ds = [s.dim(j) if isinstance(s, _Tensor) else None for s in states]
        if any(d is not None for d in ds):
            if any(d is None for d in ds) or not all(_same_dim(ds[0], d) for d in ds):  # type: ignore[arg-type]
                raise _Unsafe(f"stack: operands carry the padded extent differently on dim {j}")
            dims[j] = ds[0]
            for d in ds[1:]:
                op.an.tie_dims(ds[0], d)  # type: ignore[arg-type]
    dims.insert(dim, None)
    pads = [s.pad for s in states if isinstance(s, _Tensor) and s.padded]
    return _Tensor(tuple(dims), max(pads) if pads else FINITE)


def _constant_pad(op: _Op) -> _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    pads = list(op.raw("pad"))
    dims = list(st.dims or (None,) * rank)
    for k in range(0, len(pads), 2):
        d = rank - 1 - k // 2
        before, after = pads[k], pads[k + 1]
        cur = dims[d]
        if cur is None:
            continue
        # Padding *before* shifts the real region; padding *after* puts constants behind the pad
        # region, where the real run has them right after its real positions.
        if before != 0 or after != 0:
            raise _Unsafe(f"constant_pad_nd pads the padded dim {d} ({before}, {after}): the "
                          "real run's border would sit behind the pad", {cur.source})
    value = op.raw("value")
    return _Tensor(tuple(dims), max(st.pad, _literal_pad(value or 0)))


def _repeat(op: _Op) -> _Tensor:
    st = op.tensor("self")
    reps = list(op.raw("repeats"))
    rank = op.rank("self")
    lead = len(reps) - rank
    dims: list[_Dim | None] = [None] * lead
    for i in range(rank):
        d = st.dim(i)
        if d is not None and reps[lead + i] != 1:
            raise _Unsafe(f"repeat tiles the padded dim {i}: copies of the pad interleave")
        dims.append(d)
    return _Tensor(tuple(dims), st.pad)


ROWS: tuple[Row, ...] = (
    ("views/reshapes: regroup dims", _Rule(_reshape, _SHAPE), (
        "view", "_unsafe_view", "reshape", "view_copy", "unsqueeze", "squeeze", "flatten",
        "unflatten", "_reshape_alias", "squeeze_copy", "unsqueeze_copy",
    )),
    ("dim shuffles", _Rule(_permute), ("permute", "transpose", "t", "permute_copy",
                                       "transpose_copy", "t_copy")),
    ("expand: size args checked", _Rule(_expand, _SHAPE), ("expand", "expand_copy")),
    ("slice: whole or within the real region", _Rule(_slice, frozenset({"start", "end", "step"})),
     ("slice", "slice_copy")),
    ("select: constant index ≥ 0", _Rule(_select), ("select", "select_copy")),
    ("split/unbind: not along the padded dim", _Rule(_split), (
        "split", "split_with_sizes", "unbind", "split_copy", "split_with_sizes_copy",
        "unbind_copy",
    )),
    ("flip/roll: not along the padded dim", _Rule(_along_dims_unsafe("dims", "flip")), ("flip",)),
    ("roll", _Rule(_along_dims_unsafe("dims", "roll")), ("roll",)),
    ("cat: padded operand last", _Rule(_cat), ("cat",)),
    ("stack", _Rule(_stack), ("stack",)),
    ("repeat", _Rule(_repeat), ("repeat",)),
)

OVERLOADS: dict[Any, _Rule] = {
    aten.view.dtype: _Rule(_view_dtype),
}
