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


def test_merging_padded_dim_as_inner_dim_is_unsafe_at_the_output() -> None:
    """The merged dim interleaves pad with real positions: fine for row-wise ops, but no slice
    of an output cuts it back."""
    gm = trace(lambda x: x.t().reshape(-1) * 2, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "output" and "merges padded dims" in r.why


def test_merged_padded_dims_split_back_are_safe() -> None:
    """``[B, S, H] -> [B*S, H] -> mm -> [B, S, H']``: how a linear layer runs on a batch of
    sequences; both padded dims survive the round trip."""
    x, w = rand(3, 5, 4), rand(4, 6, seed=1)

    def f(x, w):
        b, s, h = x.shape
        return (x.reshape(b * s, h) @ w).reshape(b, s, -1).relu()

    gm = trace(f, x, w)
    plan = analyze_padding(gm, {0: [0, 1]})
    assert plan.safe and {(o.dim, o.source) for o in plan.outputs} == {
        (0, PadSource(0, 0)), (1, PadSource(0, 1))}
    check_padded_run(gm, plan, [x, w], 8)


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


def test_a_sum_over_an_outer_product_of_two_padded_inputs() -> None:
    """``x[:, None] * y[None, :]`` is padded along both dims; with zero padding every pad
    position holds a zero factor, so summing over either dim is exact."""
    x, y = rand(5), rand(6, seed=1)
    gm = trace(lambda x, y: (x[:, None] * y[None, :]).sum(1), x, y)
    plan = analyze_padding(gm, {0: 0, 1: 0})
    assert plan.safe and plan.required_pad_value == 0.0
    check_padded_run(gm, plan, [x, y], 8)


def test_adding_tensors_padded_along_different_dims_brings_real_values_into_the_pad() -> None:
    """``x[:, None] + y[None, :]``: at (real i, pad j) the sum holds ``x[i]``, not zero, so a
    sum over dim 1 is not exact even with zero padding."""
    x, y = rand(5), rand(6, seed=1)
    gm = trace(lambda x, y: (x[:, None] + y[None, :]).sum(1), x, y)
    plan = analyze_padding(gm, {0: 0, 1: 0})
    assert not plan.verdict(1, 0).safe
    check_padded_run(gm, plan, [x, y], 8)


@pytest.mark.parametrize("op", ["topk", "sort", "cumsum", "flip", "cat"])
def test_ops_along_another_dim_than_a_merged_one_are_safe(op) -> None:
    """A router's ``topk`` over the experts of ``[B*S, E]`` tokens treats the tokens alike:
    an op that reads positions only along a dim other than the merged one keeps it."""
    along = {
        "topk": lambda h: torch.topk(h, 2, dim=-1).values,
        "sort": lambda h: torch.sort(h, dim=1).values,
        "cumsum": lambda h: h.cumsum(1),
        "flip": lambda h: h.flip(1),
        "cat": lambda h: torch.cat([h, h * 2], 1),
    }[op]

    def f(x):
        b, s, e = x.shape
        return along(x.reshape(b * s, e)).reshape(b, s, -1).relu()

    x = rand(3, 5, 6)
    gm = trace(f, x)
    plan = analyze_padding(gm, {0: [0, 1]})
    assert {PadSource(0, 0), PadSource(0, 1)} <= set(plan.padded), plan.reasons
    check_padded_run(gm, plan, [x], 8)
