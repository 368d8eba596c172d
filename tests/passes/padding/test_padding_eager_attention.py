"""The padding analysis on transformers-style *eager* attention: ``softmax(q @ k^T * scale +
mask) @ v`` written out, with an additive mask of ``torch.finfo(dtype).min`` (or ``-inf``) at
masked keys; and the same mask given to ``scaled_dot_product_attention`` (``sdpa`` cases).

Safe verdicts run padded with random pad contents (NaN and infinities where the plan does not
need zeros) and must equal the unpadded run. A ``finfo.min`` mask needs the plan's per-call
``attends`` check (``hpuopt.runtime.call_checks``): a real query row whose every key is masked
is uniform over all keys, so padding the keys changes it — shown by padding such a call anyway.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from padding_helpers import DTYPE
from test_padding_facts import (
    PROPERTY,
    _differs,
    check_plan,
    force_padded,
    gathered_mask,
    key_padding_mask,
    rejected,
    rnd,
    trace_dims,
    why,
)

from hpuopt.passes.padding import PadSource, analyze_padding
from hpuopt.runtime.call_checks import CallChecks

FINFO_MIN = torch.finfo(DTYPE).min
DYN = {0: [0, 2], 1: [0, 2], 2: [0, 2], 3: [0, 1]}  # q, k, v: [B, H, S, D]; mask: [B, S]


def eager_mask(mask: torch.Tensor, causal: bool, fill: float) -> torch.Tensor:
    """transformers' ``eager_mask``: a [B, 1, S, S] boolean mask (key padding gathered at
    ``arange`` positions, optionally causal) turned into ``where(mask, 0, fill)``."""
    b, s = mask.shape
    keep = gathered_mask(mask, b, s)[:, None, None, :]
    if causal:
        idx = torch.arange(s)
        keep = keep & (idx[None, :] <= idx[:, None])[None, None]
    return torch.where(keep, torch.zeros((), dtype=DTYPE), fill)


def matmul4(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` of two [B, H, ., .] tensors as AOTAutograd traces it (``bmm`` over
    [B*H, ., .]); ``make_fx`` of ``torch.matmul`` itself keeps a ``size`` call on torch 2.11."""
    n, h = a.shape[0], a.shape[1]
    out = torch.bmm(a.reshape(n * h, a.shape[2], a.shape[3]), b.reshape(n * h, b.shape[2],
                                                                          b.shape[3]))
    return out.view(n, h, a.shape[2], b.shape[3])


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    softmax_dtype: Any = None) -> torch.Tensor:
    """transformers' ``eager_attention_forward`` (no dropout)."""
    w = matmul4(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    w = torch.softmax(w + bias, dim=-1, dtype=softmax_dtype).to(q.dtype)
    return matmul4(w, v).transpose(1, 2).contiguous()


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """transformers' ``sdpa_attention_forward`` given a float (additive) mask."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.transpose(1, 2).contiguous()


def _inputs(b: int, s: int, seed: int, left: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (rnd(b, 2, s, 4, gen=gen) for _ in range(3))
    return [q, k, v, key_padding_mask(b, s, gen, left=left)]


def _traced(causal: bool, fill: float, softmax_dtype: Any = None,
            sdpa: bool = False) -> tuple[Any, Any]:
    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if sdpa:
            return sdpa_attention(q, k, v, eager_mask(mask, causal, fill))
        return eager_attention(q, k, v, eager_mask(mask, causal, fill), softmax_dtype)

    return f, trace_dims(f, _inputs(3, 7, 0, False), DYN)


def _attends(plan: Any) -> list[tuple[str, str, int]]:
    return [c for c in plan.checks if c[1] == "attends"]


# ------------------------------------------------------------------------------------------------
# safe verdicts hold
# ------------------------------------------------------------------------------------------------


SDPA = pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])


@SDPA
@pytest.mark.parametrize("causal", [False, True], ids=["padding", "causal+padding"])
@pytest.mark.parametrize("fill", [FINFO_MIN, -1e9, float("-inf")], ids=["finfo.min", "-1e9",
                                                                         "-inf"])
def test_eager_attention_pads_batch_and_keys(causal: bool, fill: float, sdpa: bool) -> None:
    """transformers' eager attention, and its SDPA attention given an additive mask."""
    _, gm = _traced(causal, fill, sdpa=sdpa)
    plan = analyze_padding(gm, DYN)
    assert plan.safe and plan.required_pad_value == 0.0, why(plan)
    assert {o.source.dim for o in plan.outputs} == {0, 2}
    # -inf masks the pad keys in every row; a finite fill only in rows that keep a key
    assert len(_attends(plan)) == (0 if fill == float("-inf") else 1)
    inputs = _inputs(3, 7, 1, left=False)  # right padding: every row keeps key 0
    if _attends(plan):
        assert CallChecks(gm, plan).failure(inputs) == ""
    check_plan(gm, plan, inputs, (2, 5), seed=2)


def test_softmax_in_float32_of_a_float64_sum_keeps_the_mask() -> None:
    """``softmax(..., dtype=float32)`` casts the masked sum first: the mask still masks."""
    _, gm = _traced(True, FINFO_MIN, torch.float32)
    plan = analyze_padding(gm, DYN)
    assert plan.safe, why(plan)
    assert len(_attends(plan)) == 1


@PROPERTY
@given(b=st.integers(1, 4), s=st.integers(2, 9), causal=st.booleans(), left=st.booleans(),
       fill=st.sampled_from([FINFO_MIN, float("-inf")]), seed=st.integers(0, 10**6),
       extras=st.tuples(st.integers(1, 6), st.integers(1, 6)), sdpa=st.booleans())
def test_eager_attention_safe_verdicts_hold(b: int, s: int, causal: bool, left: bool,
                                            fill: float, seed: int,
                                            extras: tuple[int, int], sdpa: bool) -> None:
    """Whenever the plan is safe and its per-call check passes on the real inputs, the padded
    run equals the unpadded one; the check fails exactly when a real row is fully masked."""
    _, gm = _traced(causal, fill, sdpa=sdpa)
    plan = analyze_padding(gm, DYN)
    assert plan.safe, why(plan)
    inputs = _inputs(b, s, seed, left)
    bias = eager_mask(inputs[3], causal, fill)
    fully_masked = bool((bias == fill).all(-1).any())
    failed = CallChecks(gm, plan).failure(inputs) if _attends(plan) else ""
    assert bool(failed) == (fully_masked and fill != float("-inf"))
    if not failed:
        check_plan(gm, plan, inputs, extras, seed=seed)


# ------------------------------------------------------------------------------------------------
# the per-call check matters; unsafe cases stay unsafe
# ------------------------------------------------------------------------------------------------


@SDPA
def test_a_fully_masked_real_row_fails_the_check_and_padding_it_would_change_the_row(
        sdpa: bool) -> None:
    """Left padding with a causal mask masks every key of the pad tokens' query rows: with
    ``finfo.min`` such a row is uniform over the keys, and over more keys once padded."""
    f, gm = _traced(True, FINFO_MIN, sdpa=sdpa)
    plan = analyze_padding(gm, DYN)
    inputs = _inputs(2, 6, 3, left=True)
    inputs[3][0, :3] = False  # row 0: three pad tokens in front, so query rows 0..2 see nothing
    failed = CallChecks(gm, plan).failure(inputs)
    assert "masks every key of a real query row" in failed
    (out,) = force_padded(gm, plan.padded, inputs, 3, zeros=True)
    assert _differs(out[:2, :6], f(*inputs))
    # the same call with a -inf mask needs no check: its fully masked rows are NaN (or, in
    # SDPA, zeros) either way
    _, gm_inf = _traced(True, float("-inf"), sdpa=sdpa)
    plan_inf = analyze_padding(gm_inf, DYN)
    assert plan_inf.safe and not _attends(plan_inf), why(plan_inf)
    check_plan(gm_inf, plan_inf, inputs, (3, 3), seed=4)


@SDPA
def test_a_mask_without_a_masking_value_in_the_key_pad_is_unsafe(sdpa: bool) -> None:
    """``where(mask, 0, -1.0)``: -1 is no masking value, so the pad keys take weight."""
    f, gm = _traced(False, -1.0, sdpa=sdpa)
    plan = analyze_padding(gm, DYN)
    assert PadSource(3, 1) in rejected(plan), why(plan)
    assert ("does not mask every pad key" if sdpa else "softmax") in why(plan), why(plan)
    inputs = _inputs(2, 5, 5, left=False)
    keys = [PadSource(1, 2), PadSource(2, 2), PadSource(3, 1)]
    (out,) = force_padded(gm, keys, inputs, 3, zeros=True)
    assert _differs(out, f(*inputs))


def test_a_finfo_min_mask_beside_a_term_that_is_not_scores_is_unsafe() -> None:
    """A second additive term (here a masked copy of the scores) could mask a real row's every
    key on its own, which the check on the mask term alone would not see."""
    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = matmul4(q, k.transpose(2, 3))
        other = torch.where(scores > 0, scores, FINFO_MIN)
        w = torch.softmax(other + eager_mask(mask, False, FINFO_MIN), dim=-1)
        return matmul4(w, v)

    gm = trace_dims(f, _inputs(3, 7, 0, False), DYN)
    plan = analyze_padding(gm, DYN)
    assert PadSource(3, 1) in rejected(plan), why(plan)
    assert "not a scaled contraction" in why(plan)


def test_values_that_may_be_nan_in_the_pad_are_unsafe() -> None:
    """Masked pad keys weigh exactly 0, and 0 x NaN is NaN: the values must be finite there."""
    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return eager_attention(q, k, v.log(), eager_mask(mask, False, FINFO_MIN))

    gm = trace_dims(f, _inputs(3, 7, 0, False), DYN)
    plan = analyze_padding(gm, DYN)
    assert PadSource(2, 2) in rejected(plan), why(plan)


# ------------------------------------------------------------------------------------------------
# log_softmax over the masked key dim
# ------------------------------------------------------------------------------------------------


LOG_DYN = {0: [0, 2], 1: [0, 2], 2: [0, 1]}  # q, k: [B, H, S, D]; mask: [B, S]


def _qk_mask(b: int, s: int, seed: int, left: bool) -> list[torch.Tensor]:
    q, k, _, mask = _inputs(b, s, seed, left)
    return [q, k, mask]


def _log_weights(causal: bool, fill: float) -> tuple[Any, Any]:
    """Attention log-weights, ``log_softmax(q @ k^T * scale + mask)``, returned whole: the real
    block is exact, the pad keys' columns are sliced off."""
    def f(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = matmul4(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        return torch.log_softmax(w + eager_mask(mask, causal, fill), dim=-1)

    return f, trace_dims(f, _qk_mask(3, 7, 0, False), LOG_DYN)


@PROPERTY
@given(b=st.integers(1, 4), s=st.integers(2, 9), causal=st.booleans(), left=st.booleans(),
       fill=st.sampled_from([FINFO_MIN, float("-inf")]), seed=st.integers(0, 10**6),
       extras=st.tuples(st.integers(1, 6), st.integers(1, 6)))
def test_log_softmax_over_masked_keys_safe_verdicts_hold(b: int, s: int, causal: bool,
                                                         left: bool, fill: float, seed: int,
                                                         extras: tuple[int, int]) -> None:
    _, gm = _log_weights(causal, fill)
    plan = analyze_padding(gm, LOG_DYN)
    assert plan.safe and plan.required_pad_value == 0.0, why(plan)
    assert {o.source.dim for o in plan.outputs} == {0, 2}
    assert len(_attends(plan)) == (0 if fill == float("-inf") else 1)
    inputs = _qk_mask(b, s, seed, left)
    if _attends(plan) and CallChecks(gm, plan).failure(inputs):
        return  # a real row fully masked: that call runs exact (the check's test is above)
    check_plan(gm, plan, inputs, extras, seed=seed)


def test_log_softmax_over_unmasked_padded_keys_is_unsafe() -> None:
    """Without a mask the pad keys enter the normaliser: refused, and padding anyway changes
    every real row."""
    def f(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(matmul4(q, k.transpose(2, 3)), dim=-1)

    gen = torch.Generator().manual_seed(9)
    q, k = rnd(2, 2, 5, 4, gen=gen), rnd(2, 2, 5, 4, gen=gen)
    dyn = {0: [0, 2], 1: [0, 2]}
    gm = trace_dims(f, [q, k], dyn)
    plan = analyze_padding(gm, dyn)
    assert PadSource(1, 2) in rejected(plan) and "log_softmax" in why(plan), why(plan)
    (out,) = force_padded(gm, [PadSource(1, 2)], [q, k], 3, zeros=True)
    assert _differs(out[..., :5], f(q, k))
