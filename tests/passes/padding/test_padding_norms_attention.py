"""Padding analysis: normalisations and attention (rules 10 and 14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from padding_helpers import DTYPE, check_padded_run, only_reason, rand, trace

from hpuopt.passes.padding import analyze_padding


def test_batch_norm_training_is_unsafe() -> None:
    def f(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, mean, var, training=True)

    gm = trace(f, rand(5, 3), torch.zeros(3, dtype=DTYPE), torch.ones(3, dtype=DTYPE))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert "batch_norm" in r.op and "training" in r.why


def test_batch_norm_eval_is_safe() -> None:
    def f(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, mean, var, training=False)

    inputs = [rand(5, 3), torch.zeros(3, dtype=DTYPE), torch.ones(3, dtype=DTYPE)]
    gm = trace(f, *inputs)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    check_padded_run(gm, plan, inputs, 8)


def test_causal_attention_padded_on_sequence_is_safe() -> None:
    q, k, v = rand(2, 2, 5, 4), rand(2, 2, 5, 4, seed=1), rand(2, 2, 5, 4, seed=2)

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    gm = trace(lambda q, k, v: attn(q, k, v, True), q, k, v)
    plan = analyze_padding(gm, {0: 2, 1: 2, 2: 2})
    assert plan.safe, [str(r) for r in plan.reasons]
    # pad keys get weight 0, but the kernel multiplies it by the pad values: they must be
    # finite, so the pad is zeros
    assert plan.required_pad_value == 0.0
    check_padded_run(gm, plan, [q, k, v], 8)
    refused = analyze_padding(gm, {0: 2, 1: 2, 2: 2}, allow_zero_pad=False)
    assert not refused.safe and "causal attention" in str(refused.reasons[0])
    gm = trace(lambda q, k, v: attn(q, k, v, False), q, k, v)
    assert not analyze_padding(gm, {0: 2, 1: 2, 2: 2}).safe
