"""The masked_fill pass: one-value boolean-mask assignments become where, and stay captured."""

from __future__ import annotations

import torch

import hpuopt
from hpuopt import Config
from hpuopt.passes.masked_fill import MaskedFillPass, MaskedFillRewrite, MaskedFillSkipped
from hpuopt.testing import assert_ops

aten = torch.ops.aten


def aten_graph(fn, *inputs):
    """The functionalised ATen graph AOTAutograd hands to the post-AOT passes."""
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(functionalize(fn, remove="mutations_and_views"), tracing_mode="fake")(*inputs)


def _clamp_negatives(x):
    y = torch.sin(x)
    y[y < 0] = 0.0
    return y * 2


def _mask_rows(scores, keep):
    s = scores.clone()
    s[~keep] = float("-inf")  # a mask over the leading dim only
    return torch.softmax(s, dim=-1)


def test_full_mask_becomes_where():
    x = torch.randn(5, 3)
    gm = aten_graph(_clamp_negatives, x)
    result = MaskedFillPass()(gm, Config())
    assert [type(f) for f in result.findings] == [MaskedFillRewrite]
    assert_ops(gm, {aten.index_put: 0, aten.where: 1})
    for _ in range(3):
        x = torch.randn(5, 3)
        torch.testing.assert_close(gm(x), _clamp_negatives(x.clone()))


def test_leading_dim_mask_becomes_where():
    scores, keep = torch.randn(4, 6), torch.tensor([True, False, True, True])
    gm = aten_graph(_mask_rows, scores, keep)
    assert isinstance(MaskedFillPass()(gm, Config()).findings[0], MaskedFillRewrite)
    for _ in range(3):
        scores = torch.randn(4, 6)
        keep = torch.rand(4) > 0.3
        keep[0] = True
        torch.testing.assert_close(gm(scores, keep), _mask_rows(scores, keep), equal_nan=True)


def test_per_position_values_are_left_alone():
    def f(x, other):
        y = x.clone()
        y[y < 0] = other[y < 0]
        return y

    gm = aten_graph(f, torch.randn(6), torch.randn(6))
    (found,) = MaskedFillPass()(gm, Config()).findings
    assert isinstance(found, MaskedFillSkipped) and "more than one element" in found.reason


def test_through_the_backend_nothing_is_split_out():
    compiled = torch.compile(_clamp_negatives, backend="hpugraph")
    for _ in range(3):
        x = torch.randn(5, 3)
        torch.testing.assert_close(compiled(x), _clamp_negatives(x.clone()))
    pieces = hpuopt.explain().pieces
    assert len(pieces) == 1 and pieces[0].captured and pieces[0].replays == 3
