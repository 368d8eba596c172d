"""Padding analysis, the engine: sizes read as values, in-place mutation, unsafe verdicts across
families with their reasons and source lines, jointly safe sources, missing metadata."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from padding_helpers import DTYPE, check_padded_run, only_reason, rand, reason_ops, trace

from hpuopt.passes.padding import analyze_padding
from hpuopt.records import OutputDim, PadSource


@pytest.mark.parametrize("fn, op", [
    (lambda x: x / x.shape[0], "aten.div.Tensor"),
    (lambda x: x.sum(1) / x.shape[0], "aten.div.Tensor"),
    (lambda x: x * torch.scalar_tensor(x.shape[0], dtype=DTYPE), "aten.scalar_tensor.default"),
])
def test_size_used_as_value_is_unsafe(fn: Callable[[torch.Tensor], torch.Tensor], op: str) -> None:
    gm = trace(fn, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == op and "reads the padded size as a value" in r.why


def test_size_baked_as_constant_in_a_concrete_trace_is_this_graphs_semantics() -> None:
    # make_fx(fake) bakes x.shape[0] = 5 into div(x, 5): the *graph* is padding-safe
    # (docs/padding.md).
    x = rand(5, 4)
    gm = trace(lambda x: x / x.shape[0], x, mode="fake")
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    check_padded_run(gm, plan, [x], 8)


def test_inplace_update_of_padded_input_is_unsafe() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1

    gm = trace(f, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "aten.mul_.Tensor" and "in-place mutation" in r.why


def test_copy_into_padded_input_is_unsafe() -> None:
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x[:, 0].copy_(y)
        return x

    gm = trace(f, rand(5, 4), rand(5))
    plan = analyze_padding(gm, {0: 0, 1: 0})
    assert not plan.safe
    assert "aten.copy_.default" in reason_ops(plan)


def test_inplace_update_of_intermediate_follows_functional_rule() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y.add_(1)
        return y

    x = rand(5, 4)
    gm = trace(f, x)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    check_padded_run(gm, plan, [x], 8)


@pytest.mark.parametrize("fn, op, why", [
    (lambda x: x - x.mean(0), "aten.mean.dim", "mean reduces over the padded dim"),
    (lambda x: x.sort(0).values, "aten.sort.default", "sort over the padded dim"),
    (lambda x: x + x[-1], "aten.select.int", "negative index"),
    (lambda x: x[1:], "aten.slice.Tensor", "slice along the padded dim"),
    (lambda x: torch.cat([x, x], 0), "aten.cat.default", "pad lands in the middle"),
    (lambda x: x.nonzero(), "aten.nonzero.default", "depends on the data"),
    (lambda x: x + torch.rand_like(x), "aten.rand_like.default", "random"),
    (lambda x: torch.diagonal(x) * 2, "aten.diagonal.default", "unknown op"),
])
def test_other_unsafe_ops(fn: Callable[[torch.Tensor], torch.Tensor], op: str, why: str) -> None:
    gm = trace(fn, rand(5, 4), mode="fake" if op == "aten.nonzero.default" else "symbolic")
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == op and why in r.why


def test_reason_carries_user_source_line() -> None:
    gm = trace(lambda x: torch.softmax(x, 0), rand(5, 4))
    node = next(n for n in gm.graph.nodes if n.name == "_softmax")
    node.meta["stack_trace"] = (
        'File "/src/model.py", line 12, in forward\n    h = torch.softmax(h, 0)\n'
    )
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.source_line == "/src/model.py:12 in forward: h = torch.softmax(h, 0)"
    assert "model.py:12" in str(r)


def test_only_jointly_safe_sources_are_kept() -> None:
    x, y = rand(5, 4), rand(3, 4, seed=1)
    gm = trace(lambda x, y: (x.relu(), torch.softmax(y, 0)), x, y)
    plan = analyze_padding(gm, {0: 0, 1: 0})
    assert plan.verdict(0, 0).safe and not plan.verdict(1, 0).safe
    assert plan.padded == (PadSource(0, 0),)
    assert plan.outputs == (OutputDim(0, 0, PadSource(0, 0)),)


def test_missing_metadata_is_reported_not_guessed() -> None:
    gm = torch.fx.symbolic_trace(lambda x: torch.softmax(x, 1))
    plan = analyze_padding(gm, {0: 0})
    assert not plan.safe and "no shape metadata" in plan.reasons[0].why


def test_real_mode_trace_carries_meta_and_is_analysed() -> None:
    x = rand(5, 4)
    gm = trace(lambda x: torch.softmax(x, 1) * 2, x, mode="real")
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    check_padded_run(gm, plan, [x], 8)
