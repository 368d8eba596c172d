"""Shifted positions: ``arange(k, S + k)`` over a padded ``S`` is a padded dim holding
``position + k``, and taking the shift off again (``- k``) gives the index fact of
``arange(S)``, so gathering a padded mask at such positions keeps both dims padded. Other
shifts, lengths and offsets stay unsafe, and padding them anyway changes the result.

(transformers builds positions as ``arange(n) + offset``, an index fact already when the
offset is 0; older releases wrote ``arange(past, past + n)``.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_padding_facts import (
    PROPERTY,
    check_plan,
    force_padded,
    key_padding_mask,
    rejected,
    rnd,
    trace_dims,
    why,
)

from hpuopt.passes.padding import PadSource, analyze_padding

DYN = {0: [0, 1], 1: [0, 1]}


def _gather_at(start: int, extra_end: int, minus: int) -> Any:
    """``mask[arange(k, B + k) - k, arange(k, S + k + e) - m]`` for a shift ``k``."""

    def f(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, s = mask.shape
        bi = torch.arange(start, b + start) - start
        ki = torch.arange(start, s + start + extra_end) - minus
        m = mask[bi[:, None], ki[None, :]]
        return torch.where(m, x, 0.0) * 2

    return f


@PROPERTY
@given(start=st.integers(1, 9), b=st.integers(2, 4), s=st.integers(2, 9),
       extras=st.tuples(st.integers(1, 5), st.integers(1, 5)), seed=st.integers(0, 10**6))
def test_a_shift_taken_off_again_is_an_index_fact(start: int, b: int, s: int,
                                                  extras: tuple[int, int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask, x = key_padding_mask(b, s, gen), rnd(b, s, gen=gen)
    gm = trace_dims(_gather_at(start, 0, start), [mask, x], DYN, duck=False)
    plan = analyze_padding(gm, DYN, allow_zero_pad=False)
    assert plan.safe, why(plan)
    check_plan(gm, plan, [mask, x], extras, seed=seed)


def test_positions_plus_a_shift_as_values_stay_padded() -> None:
    """``x + arange(1, S + 1)``: the values are ``position + 1`` in both runs."""
    gen = torch.Generator().manual_seed(1)
    x = rnd(3, 5, gen=gen)

    def f(x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(1, x.shape[1] + 1)

    gm = trace_dims(f, [x], {0: [1]})
    plan = analyze_padding(gm, {0: [1]}, allow_zero_pad=False)
    assert plan.safe, why(plan)
    check_plan(gm, plan, [x], (4,), seed=2)


@pytest.mark.parametrize(("extra_end", "minus", "what"), [
    (0, 2, "shift not taken off"),  # arange(1, S + 1) - 2: positions - 1
    (0, 0, "no shift taken off"),  # arange(1, S + 1): positions + 1
])
def test_other_shifts_are_unsafe(extra_end: int, minus: int, what: str) -> None:
    gen = torch.Generator().manual_seed(3)
    mask, x = key_padding_mask(3, 5, gen), rnd(3, 5, gen=gen)
    gm = trace_dims(_gather_at(1, extra_end, minus), [mask, x], DYN, duck=False)
    plan = analyze_padding(gm, DYN)
    assert PadSource(0, 1) in rejected(plan), (what, why(plan))
    if minus != 2:
        return  # the real run itself reads past the mask's end
    # positions - 1: the real run wraps position -1 onto the last real key, the padded run
    # onto the last pad key
    real = gm(mask, x)
    padded = force_padded(gm, [PadSource(0, 1), PadSource(1, 1)], [mask, x], 4, zeros=False)
    assert not torch.equal(padded[0][:, :5], real), what
