"""Transfer rules of ops that make new values: factories (``zeros``, ``new_full``, ``*_like``,
``arange``), random ops, and ops whose output shape depends on the data.

A padded size argument of a factory becomes a padded dim of the new tensor; a random op on a
padded shape draws a different stream, and a data-dependent shape is not defined position-wise:
both unsafe. Rules 16 and 17 of ``docs/padding.md``.
"""

from __future__ import annotations

from typing import Any

from hpuopt.passes.padding.binding import _SHAPE, Row, RuleFn, _Op, _Rule
from hpuopt.passes.padding.domain import ANY, FINITE, ZERO, _literal_pad, _Sym, _Tensor, _Unsafe
from hpuopt.passes.padding.index_facts import shifted_length
from hpuopt.passes.padding.rules.shapes import _size_arg_dim


def _factory(content: int, size_arg: str = "size") -> RuleFn:
    """``content``: pad fact of the new tensor (``-1``: from the literal ``fill_value``)."""

    def rule(op: _Op) -> _Tensor:
        sizes = op.raw(size_arg)
        dims = tuple(_size_arg_dim(op, s, f"size {j}") for j, s in enumerate(sizes))
        fill = op.raw("fill_value")
        pad = _literal_pad(fill) if content == -1 else content
        if isinstance(op.state("fill_value"), _Sym) and op.state("fill_value").deps:
            raise _Unsafe("fill value reads the padded size")
        return _Tensor(dims, pad)

    return rule


def _like(content: int) -> RuleFn:
    def rule(op: _Op) -> _Tensor:
        st = op.tensor("self")
        pad = _literal_pad(op.raw("fill_value")) if content == -1 else content
        return _Tensor(st.dims, pad)

    return rule


def _arange(op: _Op) -> _Tensor:
    """``arange(n)`` over a padded ``n`` is a padded dim whose pad holds the pad positions; from
    0 in steps of 1 it carries the index fact (``iota``) that indexing rules read."""
    start, end, step = op.raw("start"), op.raw("end"), op.raw("step")
    iota = 0 if start in (None, 0) and step in (None, 1) else None
    end_state = op.an.state_of(end)
    if isinstance(end_state, _Sym) and end_state.deps:
        if iota == 0 and end_state.exact is not None:
            return _Tensor((end_state.exact,), FINITE, iota=0)
        length = shifted_length(op) if step in (None, 1) else None
        if length is not None:  # arange(k, S + k): positions + k, extent S (see index_facts)
            return _Tensor((length,), FINITE)
        raise _Unsafe("arange bounds are a function of the padded size")
    for name in ("start", "step"):
        s = op.state(name)
        if isinstance(s, _Sym) and s.deps:
            raise _Unsafe(f"arange {name} reads the padded size")
    return _Tensor(None, FINITE, iota=iota)


def _random(op: _Op) -> Any:
    raise _Unsafe("random op on a padded shape: the padded run draws a different stream, so the "
                  "real region differs from the unpadded run (see rule 17)")


def _data_dependent(op: _Op) -> Any:
    raise _Unsafe("output shape depends on the data (not defined position-wise)")


ROWS: tuple[Row, ...] = (
    ("factories: padded size args become padded dims", _Rule(_factory(ZERO), _SHAPE), (
        "zeros", "new_zeros",
    )),
    ("factories (ones)", _Rule(_factory(FINITE), _SHAPE), ("ones", "new_ones")),
    ("factories (full)", _Rule(_factory(-1), _SHAPE), ("full", "new_full")),
    ("factories (empty)", _Rule(_factory(ANY), _SHAPE), (
        "empty", "new_empty", "empty_strided", "new_empty_strided",
    )),
    ("*_like", _Rule(_like(ZERO)), ("zeros_like",)),
    ("*_like (ones)", _Rule(_like(FINITE)), ("ones_like",)),
    ("*_like (full)", _Rule(_like(-1)), ("full_like",)),
    ("*_like (empty)", _Rule(_like(ANY)), ("empty_like",)),
    ("arange(size)", _Rule(_arange, frozenset({"start", "end", "step"})), ("arange",)),
    ("random", _Rule(_random, _SHAPE), (
        "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
        "bernoulli", "native_dropout", "dropout", "normal", "uniform", "multinomial",
    )),
    ("data-dependent output shape", _Rule(_data_dependent), (
        "nonzero", "nonzero_static", "unique_dim", "_unique2", "_unique", "unique_consecutive",
        "masked_select", "repeat_interleave", "_local_scalar_dense", "item",
    )),
)
