"""Padding analysis: routed experts computed per (token, expert) pair, as transformers'
``batched_mm`` experts do. Tokens are ``[B, S]`` merged into ``B*S`` and each repeated for its
``K`` experts (``[B*S, K] -> [B*S*K]``: a merged dim with an unpadded inner part), the experts'
weights gathered at the router's ``topk`` positions (in range whatever the pad rows held), the
top-k weights renormalised by their sum (positive: it includes the row's largest probability),
and the pairs summed back per token. Pads hold NaN and infinities ("any contents"), as the
runtime's do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from padding_helpers import DTYPE, check_padded_run, rand, trace

from hpuopt.passes.padding import analyze_padding

B, S, H, E, K, I = 3, 5, 6, 4, 2, 7


def routed(h: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor,
           down: torch.Tensor) -> torch.Tensor:
    b, s, hidden = h.shape
    flat = h.reshape(-1, hidden)
    probs = F.softmax(flat @ router.t(), dim=-1)
    weights, ids = torch.topk(probs, K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    tokens = flat.shape[0]
    pairs = flat.unsqueeze(1).expand(tokens, K, hidden).reshape(tokens * K, hidden)
    ids = ids.reshape(-1)
    up = torch.bmm(gate_up[ids], pairs.unsqueeze(-1)).squeeze(-1)
    gate, lin = up.chunk(2, dim=-1)
    out = torch.bmm(down[ids], (F.silu(gate) * lin).unsqueeze(-1)).squeeze(-1)
    out = out * weights.reshape(-1, 1)
    return out.view(tokens, K, hidden).sum(dim=1).view(b, s, hidden)


def _inputs() -> list[torch.Tensor]:
    return [rand(B, S, H), rand(E, H, seed=1), rand(E, 2 * I, H, seed=2), rand(E, H, I, seed=3)]


def test_routed_experts_pad_batch_and_sequence() -> None:
    inputs = _inputs()
    gm = trace(routed, *inputs)
    plan = analyze_padding(gm, {0: (0, 1)})
    assert plan.safe, [str(r) for r in plan.reasons]
    assert {(s.input, s.dim) for s in plan.padded} == {(0, 0), (0, 1)}
    for bucket in (8, 16):
        for seed in range(3):
            check_padded_run(gm, plan, inputs, bucket, seed)


def test_expert_weights_gathered_at_arbitrary_padded_ids_need_zero_padding() -> None:
    """Ids that are not a topk's positions may hold anything in the pad: out of range."""

    def f(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return table[ids.reshape(-1)].sum(-1)

    ids = torch.randint(0, E, (B, K))
    gm = trace(f, ids, rand(E, H))
    refused = analyze_padding(gm, {0: 0}, allow_zero_pad=False)
    assert not refused.safe and "indices" in str(refused.reasons[0])


def test_positions_from_a_wider_topk_are_not_in_range() -> None:
    """topk over 8 columns indexes a table of 4 rows: positions may be out of its range."""

    def f(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return table[torch.topk(x, 2, dim=-1).indices.reshape(-1)]

    gm = trace(f, rand(B, 8), rand(4, H, seed=1))
    refused = analyze_padding(gm, {0: 0}, allow_zero_pad=False)
    assert not refused.safe


def test_a_reshape_cutting_through_a_merged_part_is_refused() -> None:
    def f(h: torch.Tensor) -> torch.Tensor:
        b, s, hidden = h.shape
        pairs = h.reshape(-1, hidden).unsqueeze(1).expand(b * s, 4, hidden)
        return pairs.reshape(b * s * 2, 2 * hidden).sum(-1)  # cuts each token's 4 copies

    gm = trace(f, rand(B, S, H))
    plan = analyze_padding(gm, {0: (0, 1)})
    assert not plan.safe
    assert any("boundaries" in str(r) or "merge" in str(r) for r in plan.reasons)


def test_dividing_by_a_sum_that_may_be_zero_is_not_finite() -> None:
    """``w / w.sum()`` of values that are not a softmax's top-k may divide by zero in the pad:
    the next contraction over the padded dim then refuses."""

    def f(x: torch.Tensor) -> torch.Tensor:
        w = torch.relu(x)
        return (w / w.sum(-1, keepdim=True)).t() @ x

    x = rand(5, 3).abs() + 0.1
    gm = trace(f, x)
    refused = analyze_padding(gm, {0: 0})
    assert not refused.safe
    assert x.dtype == DTYPE
