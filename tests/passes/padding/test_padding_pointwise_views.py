"""Padding analysis: pointwise broadcasting, views and reshapes, transposes and ``cat`` (rules 2
to 6 of docs/padding.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from padding_helpers import check_padded_run, only_reason, rand, trace

from hpuopt.passes.padding import analyze_padding
from hpuopt.records import OutputDim, PadSource


def test_broadcast_bias_add_is_safe_and_size1_broadcast_padded_is_not() -> None:
    x, b = rand(5, 4), rand(4, seed=1)
    gm = trace(lambda x, b: x + b, x, b)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    check_padded_run(gm, plan, [x, b], 8)
    # padding an input against an unpadded input of the same extent cannot even broadcast
    y = rand(5, 4, seed=2)
    gm = trace(lambda x, y: x + y, x, y)
    plan = analyze_padding(gm, {0: 0})
    assert not plan.safe and "meets unpadded dim 0" in plan.reasons[0].why
    plan = analyze_padding(gm, {0: 0, 1: 0})  # both padded: fine, and tied to one bucket
    assert plan.safe and plan.ties == ((PadSource(0, 0), PadSource(1, 0)),)


@pytest.mark.parametrize("reduce, op", [
    (lambda m: m.mean(0), "aten.mean.dim"),
    (lambda m: m.amax(0), "aten.amax.default"),
    (lambda m: m.sum(0), "aten.sum.dim_IntList"),
])
def test_merging_view_then_reduction_over_merged_dim_is_unsafe(
        reduce: Callable[[torch.Tensor], torch.Tensor], op: str) -> None:
    gm = trace(lambda x: reduce(x.view(-1, x.shape[2]).relu()), rand(5, 3, 4))
    r = only_reason(analyze_padding(gm, {0: 0}, allow_zero_pad=False))
    assert r.op == op and "padded dim 0" in r.why


def test_merging_view_with_row_ops_is_safe_and_slices_by_factor() -> None:
    x, w = rand(5, 3, 4), rand(6, 4, seed=1)
    gm = trace(lambda x, w: F.linear(x.reshape(-1, x.shape[2]), w).relu(), x, w)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    assert plan.outputs == (OutputDim(0, 0, PadSource(0, 0), 1, ((0, 1),)),)
    assert str(plan.outputs[0]) == "output 0 dim 0 = input 0 dim 0 × input 0 dim 1"
    check_padded_run(gm, plan, [x, w], 8)


def test_merging_padded_dim_as_inner_dim_is_unsafe() -> None:
    gm = trace(lambda x: x.t().reshape(-1) * 2, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "aten._unsafe_view.default" and "inner dim" in r.why


def test_transpose_then_per_row_ops_is_safe() -> None:
    x = rand(5, 4)
    gm = trace(lambda x: torch.softmax(x.t() * 3, dim=0).relu(), x)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and plan.outputs == (OutputDim(0, 1, PadSource(0, 0)),)
    check_padded_run(gm, plan, [x], 8)


def test_cat_after_a_fixed_prefix_is_safe_and_shifted() -> None:
    cache, x = rand(3, 4), rand(5, 4, seed=1)
    gm = trace(lambda c, x: torch.cat([c, x], 0).relu(), cache, x)
    plan = analyze_padding(gm, {1: 0}, allow_zero_pad=False)
    assert plan.safe and plan.outputs == (OutputDim(0, 0, PadSource(1, 0), shifted=True),)
    check_padded_run(gm, plan, [cache, x], 8)
