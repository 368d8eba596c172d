"""Padding analysis: reductions, softmax, order statistics and scans (rules 9 and 11 to 13)."""

from __future__ import annotations

import torch
from padding_helpers import check_padded_run, only_reason, pad_input, rand, trace

from hpuopt.passes.padding import analyze_padding
from hpuopt.records import OutputDim, PadSource


def test_softmax_over_padded_dim_is_unsafe() -> None:
    gm = trace(lambda x: torch.softmax(x, 0) + 1, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert (r.node, r.op) == ("_softmax", "aten._softmax.default")
    assert "softmax over the padded dim 0" in r.why
    assert r.sources == (PadSource(0, 0),)


def test_log_softmax_over_other_dim_is_safe() -> None:
    gm = trace(lambda x: torch.log_softmax(x, 1), rand(5, 4))
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and plan.outputs == (OutputDim(0, 0, PadSource(0, 0)),)


def test_sum_over_padded_dim_needs_zero_pad() -> None:
    x = rand(5, 4)
    gm = trace(lambda x: x.sum(0), x)
    r = only_reason(analyze_padding(gm, {0: 0}, allow_zero_pad=False))
    assert r.op == "aten.sum.dim_IntList" and "pad value 0" in r.why
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and plan.required_pad_value == 0.0
    assert plan.verdict(0, 0).required_pad_value == 0.0
    check_padded_run(gm, plan, [x], 8)  # zeros: exact
    random_pad = pad_input(x, 0, 8, False, torch.Generator().manual_seed(1))
    assert not torch.allclose(gm(random_pad), gm(x))  # the requirement is real


def test_cumsum_over_padded_dim_is_a_causal_scan() -> None:
    # Deliberate: position i of a forward scan reads positions <= i only, and the pad is appended
    # after the real region, so every real output is exact for any pad contents (rule 13).
    x = rand(5, 4)
    gm = trace(lambda x: torch.cumsum(x, 0), x)
    plan = analyze_padding(gm, {0: 0}, allow_zero_pad=False)
    assert plan.safe
    check_padded_run(gm, plan, [x], 8)


def test_reverse_cumsum_over_padded_dim_is_unsafe() -> None:
    gm = trace(lambda x: torch.cumsum(x.flip(0), 0).flip(0), rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "aten.flip.default" and "flip along the padded dim 0" in r.why


def test_topk_along_padded_dim_is_unsafe() -> None:
    gm = trace(lambda x: torch.topk(x, 2, dim=0).values, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "aten.topk.default" and "padded dim 0" in r.why


def test_topk_along_other_dim_is_safe() -> None:
    x = rand(5, 4)
    gm = trace(lambda x: torch.topk(x, 2, dim=1), x)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and {o.output for o in plan.outputs} == {0, 1}
    check_padded_run(gm, plan, [x], 8)
