"""Padding analysis: contractions (rule 7: rows carry, contracting over the padded dim needs
zero pad) and lookups with padded indices (rule 8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from padding_helpers import check_padded_run, only_reason, rand, trace

from hpuopt.passes.padding import analyze_padding
from hpuopt.records import OutputDim, PadSource


def test_matmul_contracting_over_padded_dim() -> None:
    x = rand(5, 4)
    gm = trace(lambda x: x.t() @ x, x)
    r = only_reason(analyze_padding(gm, {0: 0}, allow_zero_pad=False))
    assert r.op == "aten.mm.default" and "contraction over the padded input 0 dim 0" in r.why
    plan = analyze_padding(gm, {0: 0})
    assert plan.required_pad_value == 0.0
    check_padded_run(gm, plan, [x], 8)
    # exp(0) = 1: the pad of exp(x) is finite but not zero; x's zero pad still makes it exact.
    gm = trace(lambda x: x.exp().t() @ x, x)
    assert analyze_padding(gm, {0: 0}).required_pad_value == 0.0
    # neither operand's pad is zero: unsafe whatever the pad value
    gm = trace(lambda x: x.exp().t() @ x.exp(), x)
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "aten.mm.default" and "pad × pad" in r.why


def test_mlp_padded_on_batch_is_safe() -> None:
    def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, w1, b1))
        return F.layer_norm(F.linear(h, w2), (4,), g, b)

    inputs = [rand(5, 4), rand(6, 4, seed=1), rand(6, seed=2), rand(4, 6, seed=3),
              rand(4, seed=4), rand(4, seed=5)]
    gm = trace(mlp, *inputs)
    plan = analyze_padding(gm, {0: 0}, allow_zero_pad=False)
    assert plan.safe and plan.required_pad_value is None and plan.reasons == ()
    assert plan.outputs == (OutputDim(0, 0, PadSource(0, 0)),)
    assert str(plan.outputs[0]) == "output 0 dim 0 = input 0 dim 0"
    for bucket in (6, 8, 16):
        check_padded_run(gm, plan, inputs, bucket, seed=bucket)


def test_embedding_with_padded_indices_needs_zero_pad() -> None:
    idx = torch.tensor([[1, 2, 0], [3, 3, 1], [0, 1, 2], [2, 2, 2], [1, 0, 3]])
    table = rand(4, 6)
    gm = trace(lambda i, w: F.embedding(i, w).relu(), idx, table)
    r = only_reason(analyze_padding(gm, {0: 0}, allow_zero_pad=False))
    assert r.op == "aten.embedding.default" and "pad value 0" in r.why
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and plan.required_pad_value == 0.0
    check_padded_run(gm, plan, [idx, table], 8)
