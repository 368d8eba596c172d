"""The abstract domain of the padding analysis: what it knows about each value of a graph.

A tensor's state (:class:`_Tensor`) says, per dim, whether the dim carries a padded extent
(:class:`_Dim`: which pad source, with what factor and offset) and what its pad region holds
(the pad-content facts ``ZERO ⊂ FINITE ⊂ ANY``). A symbolic integer's state (:class:`_Sym`) says
which pad sources its value depends on. :data:`_UNPADDED` is the state of anything the padding
cannot reach; :data:`_POISON` marks the result of a node already reported unsafe. A transfer rule
that cannot prove an op safe raises :class:`_Unsafe`. See ``docs/padding.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any

from torch.fx.experimental.symbolic_shapes import statically_known_true

from hpuopt.records import PadSource

ZERO, FINITE, ANY = 0, 1, 2
"""Pad-content facts, ordered by inclusion: ZERO ⊂ FINITE ⊂ ANY (see docs/padding.md)."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Dim:
    source: PadSource
    factor: Any = 1  # int | torch.SymInt (not hashable: never put a _Dim in a set)
    offset: Any = 0  # int | torch.SymInt
    parts: tuple[tuple[_Dim | None, Any], ...] | None = None
    """A merged dim (``[B, S, H] -> [B*S, H]`` with ``B`` and ``S`` padded): each merged dim's
    state and traced extent, outermost first. Position ``p`` is real when every part's index
    is; the rest is pad. Row-wise ops keep it, a reshape back splits it into its parts, and an
    output cannot carry it (no single ``narrow`` cuts it back). ``source`` is the first padded
    part's."""

    @property
    def shifted(self) -> bool:
        return not _same(self.offset, 0)

    @property
    def sources(self) -> tuple[PadSource, ...]:
        if self.parts is None:
            return (self.source,)
        return tuple(s for d, _ in self.parts if d is not None for s in d.sources)

    @staticmethod
    def merged(parts: tuple[tuple[_Dim | None, Any], ...]) -> _Dim:
        first = next(d for d, _ in parts if d is not None)
        return _Dim(first.source, parts=parts)


@dataclasses.dataclass(frozen=True, eq=False)
class _Perm:
    """A permutation fact (``permutation.py``): what a tensor holds in terms of the permutation
    a ``sort`` (``key``) made of a padded dim whose unpermuted state is ``base``.

    ``kind`` is one of ``permutation.KINDS``: rows in the sort's order (``rows``), the
    permutation itself divided by ``div`` (``index``), its inverse (``inverse``), positions
    ``0 … n - 1`` over a product of padded sizes (``positions``), or per-group counts and
    offsets of the sorted ids (``counts``, ``offsets``). ``dim`` is the tensor's dim the fact
    is about (``None`` for counts and offsets, which have no padded dim but values that differ
    between the runs); ``sources`` are the pad sources it depends on."""

    kind: str
    key: Any  # the sort node (torch.fx.Node); None for positions
    dim: int | None
    base: _Dim | None
    sources: frozenset[PadSource]
    div: int = 1
    ascending: bool = True  # the key sorts ascending (what offsets line up with)


@dataclasses.dataclass(frozen=True, eq=False)
class _Tensor:
    dims: tuple[_Dim | None, ...] | None  # None: no padded dim (rank possibly unknown)
    pad: int = ANY
    iota: int | None = None
    """An index fact: the value at every position equals the position along dim ``iota`` (an
    ``arange`` through views, expands and ``+ 0``), in the real region and the pad alike."""
    fills: tuple[tuple[int, Any], ...] = ()
    """Fill facts ``(dim, value)``: wherever the index along ``dim`` is pad, the value is
    ``value`` (0, 1 or -inf), whatever the other indices (``fills.py``)."""
    perm: _Perm | None = None
    """A permutation fact (``permutation.py``). Every op with such an operand goes to the
    permutation module first, which refuses what it does not understand: no other rule ever
    sees one."""

    @property
    def padded(self) -> bool:
        return self.dims is not None and any(d is not None for d in self.dims)

    def dim(self, i: int) -> _Dim | None:
        return None if self.dims is None else self.dims[i]

    def with_iota(self, iota: int | None) -> _Tensor:
        return dataclasses.replace(self, iota=iota)


@dataclasses.dataclass(frozen=True)
class _Sym:
    deps: frozenset[PadSource] = frozenset()
    exact: _Dim | None = None  # the value *is* the extent of a dim with this state


_UNPADDED = _Tensor(None, FINITE)
_POISON = object()  # the result of a node reported unsafe; consumers are skipped silently


class _Unsafe(Exception):
    def __init__(self, why: str, sources: Iterable[PadSource] | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.sources = None if sources is None else frozenset(sources)


def _state_sources(state: Any) -> Iterator[PadSource]:
    if isinstance(state, _Tensor):
        if state.dims is not None:
            yield from (s for d in state.dims if d is not None for s in d.sources)
        if state.perm is not None:
            yield from state.perm.sources
    elif isinstance(state, _Sym):
        yield from state.deps
    elif isinstance(state, (tuple, list)):
        for s in state:
            yield from _state_sources(s)


def _same(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b))


def _same_dim(a: _Dim, b: _Dim) -> bool:
    if a.parts is not None or b.parts is not None:
        return a.parts is not None and b.parts is not None and len(a.parts) == len(b.parts) \
            and all(_same(na, nb) and ((da is None and db is None) or (
                da is not None and db is not None and _same_dim(da, db)))
                for (da, na), (db, nb) in zip(a.parts, b.parts))
    return _same(a.offset, b.offset) and _same(a.factor, b.factor)


def _dim_pairs(a: _Dim, b: _Dim) -> Iterator[tuple[PadSource, PadSource]]:
    """The sources two same-layout dims pair up (to be tied to one bucket)."""
    if a.parts is None or b.parts is None:
        yield a.source, b.source
        return
    for (da, _), (db, _) in zip(a.parts, b.parts):
        if da is not None and db is not None:
            yield from _dim_pairs(da, db)


def _prod(values: Iterable[Any]) -> Any:
    result: Any = 1
    for v in values:
        result = result * v
    return result


def _literal_pad(v: Any) -> int:
    """The pad-content fact of a constant operand (a Python scalar)."""
    if isinstance(v, bool):
        return ZERO if not v else FINITE
    if isinstance(v, (int, float)):
        if v == 0:
            return ZERO
        return FINITE if math.isfinite(v) else ANY
    return FINITE
