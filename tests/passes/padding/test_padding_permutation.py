"""Padding analysis: routed experts over tokens *sorted* by expert, as transformers' default
experts (``grouped_mm_experts_forward``) compute them. The (token, expert) pairs ``[B*S*K]`` are
sorted by expert id, the pairs' rows gathered in that order (``flat[perm // K]``), multiplied
per expert by a grouped matmul whose offsets are the cumulative counts of the sorted ids
(``histc`` then ``cumsum``), weighted row by row and put back in the pairs' order by the inverse
permutation (``inv[perm] = arange``). The padded run sorts pad pairs among real ones; the
permutation facts (``hpuopt/passes/padding/permutation.py``) prove the real pairs' results come
back to their own positions. Pads hold NaN and infinities ("any contents"), as the runtime's do;
the unsafe variants are asserted unsafe, and some are padded anyway to show the verdict
matters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from padding_helpers import DTYPE, check_padded_run, pad_input, rand, trace

from hpuopt.passes.padding import analyze_padding

B, S, H, E, K, I = 3, 5, 6, 4, 2, 7

transformers_moe = pytest.importorskip("transformers.integrations.moe")


def fallback_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch.ops.transformers.grouped_mm_fallback(x, w, offs=offs)


def aten_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``aten._grouped_mm`` in bfloat16 (what its meta function accepts), as transformers calls
    it: the input cast to the weights' type."""
    return torch._grouped_mm(x.to(torch.bfloat16), w, offs=offs).to(x.dtype)


def route(h: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, ...]:
    flat = h.reshape(-1, h.shape[-1])
    probs = F.softmax(flat @ router.t(), dim=-1)
    weights, ids = torch.topk(probs, K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return flat, weights.reshape(-1), ids.reshape(-1)


def offsets_of(ids_g: torch.Tensor, lo: float = 0, hi: float = E - 1) -> torch.Tensor:
    counts = torch.histc(ids_g.float(), bins=E, min=lo, max=hi)
    return torch.cumsum(counts, dim=0, dtype=torch.int32)


def experts(x_g: torch.Tensor, offs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
            gmm: Callable[..., torch.Tensor]) -> torch.Tensor:
    up = gmm(x_g, gate_up.transpose(-2, -1), offs)
    gate, lin = up.chunk(2, dim=-1)
    return gmm(F.silu(gate) * lin, down.transpose(-2, -1), offs)


def inverse(perm: torch.Tensor, scatter: bool = False) -> torch.Tensor:
    inv = torch.empty_like(perm)
    if scatter:
        return inv.scatter_(0, perm, torch.arange(perm.size(0)))
    inv[perm] = torch.arange(perm.size(0))
    return inv


def grouped(h: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """transformers' ``grouped_mm_experts_forward``, written out."""
    return grouped_with(h, router, gate_up, down)


def grouped_with(h: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, gmm: Callable[..., torch.Tensor] = fallback_mm,
                 scatter: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    b, s, hidden = h.shape
    flat, weights, ids = route(h, router)
    ids_g, perm = torch.sort(ids)
    x_g = flat[perm // K]
    out = experts(x_g, offsets_of(ids_g), gate_up, down, gmm)
    if bias is not None:
        out = out + bias[ids_g]
    out = out * weights[perm].unsqueeze(-1)
    out = out[inverse(perm, scatter)]
    return out.view(flat.shape[0], K, hidden).sum(dim=1).view(b, s, hidden)


def back(pairs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The pairs' results summed per token, ``[B, S, H]`` again."""
    b, s, hidden = h.shape
    return pairs.view(b * s, K, hidden).sum(dim=1).view(b, s, hidden)


def _inputs(dtype: torch.dtype = DTYPE, hidden: int = H, inter: int = I) -> list[torch.Tensor]:
    return [rand(B, S, hidden).to(dtype), rand(E, hidden, seed=1).to(dtype),
            rand(E, 2 * inter, hidden, seed=2).to(dtype), rand(E, hidden, inter, seed=3).to(dtype)]


def _check(fn: Callable[..., Any], inputs: list[Any], pad: dict[int, Any], mode: str = "symbolic",
           buckets: tuple[int, ...] = (8, 16)) -> None:
    gm = trace(fn, *inputs, mode=mode)
    plan = analyze_padding(gm, pad)
    assert plan.safe, [str(r) for r in plan.reasons]
    assert plan.padded
    for bucket in buckets:
        for seed in range(3):
            check_padded_run(gm, plan, inputs, bucket, seed)


def test_grouped_experts_pad_batch_and_sequence() -> None:
    inputs = _inputs()
    gm = trace(grouped, *inputs)
    plan = analyze_padding(gm, {0: (0, 1)}, allow_zero_pad=False)
    assert plan.safe, [str(r) for r in plan.reasons]
    assert {(s.input, s.dim) for s in plan.padded} == {(0, 0), (0, 1)}
    _check(grouped, inputs, {0: (0, 1)})


def test_grouped_experts_pad_the_batch_alone() -> None:
    """Only the batch padded: the pairs' dim is a plain padded dim (factor S·K), not merged."""
    _check(grouped, _inputs(), {0: 0}, mode="dynamic_batch")


def test_aten_grouped_mm_and_a_scattered_inverse() -> None:
    """``aten._grouped_mm`` (bfloat16 weights with rows of 16-byte multiples) and the inverse
    built by ``scatter_`` instead of ``index_put``."""

    def f(h, router, gate_up, down):
        return grouped_with(h, router, gate_up, down, gmm=aten_mm, scatter=True)

    h, router, gate_up, down = _inputs(torch.float32, hidden=8, inter=8)
    _check(f, [h, router, gate_up.bfloat16(), down.bfloat16()], {0: (0, 1)})


def test_a_bias_gathered_at_the_sorted_ids() -> None:
    def f(h, router, gate_up, down, bias):
        return grouped_with(h, router, gate_up, down, bias=bias)

    _check(f, [*_inputs(), rand(E, H, seed=4)], {0: (0, 1)})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.sampled_from([3, 5]), s=st.sampled_from([3, 5, 9]), extra_b=st.integers(0, 3),
       extra_s=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_random_shapes_and_pads(b: int, s: int, extra_b: int, extra_s: int, seed: int) -> None:
    """Random real sizes and bucket sizes, pads of NaN, infinities and large values. (The
    sizes differ from the model's own, 1, ``K``, ``E``, ``H``, ``I``: the trace gives equal
    sizes one symbol, and the experts' count is specialised to a constant.)"""
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(b, s, H, generator=gen, dtype=DTYPE), *_inputs()[1:]]
    gm = trace(grouped, *inputs)
    plan = analyze_padding(gm, {0: (0, 1)})
    assert plan.safe, [str(r) for r in plan.reasons]
    padded = pad_input(pad_input(inputs[0], 0, b + extra_b, False, gen), 1, s + extra_s, False,
                       gen)
    got = gm(padded, *inputs[1:])[:b, :s]
    torch.testing.assert_close(got, gm(*inputs), equal_nan=True)


# -- unsafe variants -----------------------------------------------------------------------------


def _refused(fn: Callable[..., Any], inputs: list[Any], *words: str,
             pad: Any = (0, 1), mode: str = "symbolic") -> torch.fx.GraphModule:
    gm = trace(fn, *inputs, mode=mode)
    plan = analyze_padding(gm, {0: pad})
    assert not plan.safe
    text = " | ".join(str(r) for r in plan.reasons)
    assert all(w in text for w in words), text
    return gm


def _padded_anyway(gm: torch.fx.GraphModule, inputs: list[Any]) -> bool:
    """Whether padding batch and sequence (NaN pads) changes the real region: the refusal
    matters."""
    gen = torch.Generator().manual_seed(0)
    padded = pad_input(pad_input(inputs[0], 0, B + 3, False, gen), 1, S + 3, False, gen)
    try:
        got = gm(padded, *inputs[1:])
    except (RuntimeError, IndexError):
        return True
    want = gm(*inputs)
    got = got[:B, :S] if got.dim() == 3 else got
    return got.shape != want.shape or not torch.allclose(got, want, equal_nan=True)


def test_restoring_by_another_sorts_inverse_is_refused() -> None:
    """The rows follow the sort of the ids; the inverse comes from a sort of other values."""

    def f(h, router, gate_up, down):
        b, s, hidden = h.shape
        flat, weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        _, other = torch.sort(weights)
        out = experts(flat[perm // K], offsets_of(ids_g), gate_up, down, fallback_mm)
        out = out[inverse(other)]
        return out.view(flat.shape[0], K, hidden).sum(dim=1).view(b, s, hidden)

    inputs = _inputs()
    gm = _refused(f, inputs, "inverse permutation", "does not hold rows in that sort's order")
    assert _padded_anyway(gm, inputs)


def test_rows_gathered_by_another_sorts_permutation_are_refused() -> None:
    def f(h, router, gate_up, down):
        flat, weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        _, other = torch.sort(weights)
        out = experts(flat[other // K], offsets_of(ids_g), gate_up, down, fallback_mm)
        return back(out[inverse(perm)], h)

    _refused(f, _inputs(), "offsets that are not the cumulative counts")


def test_histc_with_a_range_that_drops_ids_is_refused() -> None:
    """``max = E - 2``: the last id falls out of every bin, the offsets stop short and rows of
    the last expert are left out of every group."""

    def f(h, router, gate_up, down):
        b, s, hidden = h.shape
        flat, weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        out = experts(flat[perm // K], offsets_of(ids_g, 0, E - 2), gate_up, down, fallback_mm)
        out = (out * weights[perm].unsqueeze(-1))[inverse(perm)]
        return out.view(flat.shape[0], K, hidden).sum(dim=1).view(b, s, hidden)

    _refused(f, _inputs(), "does not count each id", "in a bin of its own")
    # (0, E): bin edges on the ids themselves, float rounding decides; (1, E): id 0 dropped
    for lo, hi in ((0, E), (1, E), (-0.5, E - 0.5)):
        plan = analyze_padding(trace(_with_range(lo, hi), *_inputs()), {0: (0, 1)})
        assert plan.safe == (lo == -0.5), (lo, hi, [str(r) for r in plan.reasons])


def _with_range(lo: float, hi: float) -> Callable[..., torch.Tensor]:
    def f(h, router, gate_up, down):
        flat, _weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        out = experts(flat[perm // K], offsets_of(ids_g, lo, hi), gate_up, down, fallback_mm)
        return back(out[inverse(perm)], h)

    return f


def test_ids_that_may_be_out_of_range_are_refused() -> None:
    """Ids from an input (not a topk's positions), or positions over more columns than bins."""

    def given_ids(ids, flat, gate_up, down):
        ids_g, perm = torch.sort(ids)
        out = experts(flat[perm], offsets_of(ids_g), gate_up, down, fallback_mm)
        return out[inverse(perm)]

    ids = torch.randint(0, E, (B * K,))
    inputs = [ids, rand(B * K, H), *_inputs()[2:]]
    gm = trace(given_ids, *inputs)
    plan = analyze_padding(gm, {0: 0, 1: 0})
    assert not plan.safe
    assert any("not provably ids" in str(r) for r in plan.reasons)

    def wide(h, router, gate_up, down):
        flat = h.reshape(-1, h.shape[-1])
        ids = torch.topk(flat @ router.t(), K, dim=-1).indices.reshape(-1)  # 2·E columns
        ids_g, perm = torch.sort(ids)
        out = experts(flat[perm // K], offsets_of(ids_g), gate_up, down, fallback_mm)
        return back(out[inverse(perm)], h)

    _refused(wide, [rand(B, S, H), rand(2 * E, H, seed=1), *_inputs()[2:]], "not provably ids")


def test_a_sum_across_the_permuted_rows_is_refused() -> None:
    def f(h, router, gate_up, down):
        flat, _weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        out = experts(flat[perm // K], offsets_of(ids_g), gate_up, down, fallback_mm)
        return out.sum(0)

    gm = _refused(f, _inputs(), "sum on rows in the order of")
    assert _padded_anyway(gm, _inputs())


def test_permuted_rows_meeting_rows_in_their_own_order_are_refused() -> None:
    """``out * weights`` with the weights *not* gathered by the permutation: row i of one is
    not row i of the other."""

    def f(h, router, gate_up, down):
        flat, weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        out = experts(flat[perm // K], offsets_of(ids_g), gate_up, down, fallback_mm)
        return back((out * weights.unsqueeze(-1))[inverse(perm)], h)

    _refused(f, _inputs(), "in its own order")


def test_a_view_mixing_the_permuted_rows_is_refused() -> None:
    def f(h, router, gate_up, down):
        flat, _weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        out = experts(flat[perm // K], offsets_of(ids_g), gate_up, down, fallback_mm)
        return out.view(-1, K, H).sum(1).view(h.shape)  # sorted rows' pairs: not a token's

    gm = _refused(f, _inputs(), "view on rows in the order of")
    assert _padded_anyway(gm, _inputs())


def test_rows_in_sort_order_as_an_output_are_refused() -> None:
    def f(h, router):
        _flat, weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        return weights[perm], ids_g

    _refused(f, _inputs()[:2], "output 0 holds rows in the order of")


def test_a_descending_sort_does_not_line_up_with_the_offsets() -> None:
    def f(h, router, gate_up, down):
        flat, _weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids, descending=True)
        out = experts(flat[perm // K], offsets_of(ids_g), gate_up, down, fallback_mm)
        return back(out[inverse(perm)], h)

    _refused(f, _inputs(), "descending")


def test_an_inverse_built_from_other_values_is_refused() -> None:
    """``inv[perm] = arange(n).flip(0)`` and an accumulating build are not the inverse."""

    def flipped(h, router):
        _flat, weights, ids = route(h, router)
        _ids_g, perm = torch.sort(ids)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0)).flip(0)
        return weights[perm][inv]

    def accumulated(h, router):
        _flat, weights, ids = route(h, router)
        _ids_g, perm = torch.sort(ids)
        inv = torch.zeros_like(perm)
        inv.index_put_((perm,), torch.arange(perm.size(0)), accumulate=True)
        return weights[perm][inv]

    _refused(flipped, _inputs()[:2], "flip")
    _refused(accumulated, _inputs()[:2], "index_put")


def test_positions_over_a_merged_dim_are_not_the_real_runs() -> None:
    """``arange(n)`` over a merged ``B·S``: the real rows sit at other positions in the padded
    run, so the values at them differ (this was once taken for an ordinary padded tensor)."""

    def f(h):
        flat = h.reshape(-1, h.shape[-1])
        return (flat + torch.arange(flat.shape[0], dtype=h.dtype).unsqueeze(1)).view(h.shape)

    gm = _refused(f, [rand(B, S, H)], "positions in the padded run")
    assert _padded_anyway(gm, [rand(B, S, H)])


def test_ids_changed_in_place_before_counting_are_refused() -> None:
    """The counts' proof reads the graph's nodes (the sort's values behind a cast); an in-place
    write in between (``ids_g.add_(1)``: the last id leaves every bin) makes it void. (The
    batch alone padded: an in-place op on a merged dim is refused before that.)"""

    def f(h, router, gate_up, down):
        flat, _weights, ids = route(h, router)
        ids_g, perm = torch.sort(ids)
        ids_g.add_(1)
        out = experts(flat[perm // K], offsets_of(ids_g), gate_up, down, fallback_mm)
        return back(out[inverse(perm)], h)

    _refused(f, _inputs(), "in-place write", pad=0, mode="dynamic_batch")


def test_counts_read_as_values_are_refused() -> None:
    """The per-expert counts include the pad pairs: as an output, or reduced, they would show
    the bucket's pairs, not the real ones."""

    def counted(h, router):
        _flat, _weights, ids = route(h, router)
        ids_g, _perm = torch.sort(ids)
        return torch.histc(ids_g.float(), bins=E, min=0, max=E - 1)

    def last_offset(h, router):
        _flat, weights, ids = route(h, router)
        ids_g, _perm = torch.sort(ids)
        return weights.view(h.shape[0], h.shape[1], K) * offsets_of(ids_g)[-1]

    # (a dynamic batch alone: the router's expert count is then a constant, as in a model)
    gm = _refused(counted, _inputs()[:2], "output 0 holds the counts", pad=0, mode="dynamic_batch")
    assert _padded_anyway(gm, _inputs()[:2])
    _refused(last_offset, _inputs()[:2], "select reads the per-group counts", pad=0,
             mode="dynamic_batch")
