"""The padding analysis on CUDA's memory-efficient attention: a bias padded to a multiple of 16
and sliced straight back, and a logsumexp whose query dim is rounded up to a multiple of 32.

The graphs are traced from :func:`efficient_attention.efficient_sdpa`, which makes the calls
ATen's composite makes on CUDA, once on fake CUDA tensors (the verdict a GPU run would get) and
once on CPU tensors with a CPU kernel for the efficient op, to run the safe verdicts padded with
random pad contents against the unpadded run. Variants that pad without cutting back, cut back
elsewhere, pad in front, or read the rounded logsumexp stay unsafe, and padding them anyway
changes the result.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from efficient_attention import ALIGN, cpu_kernel, efficient_sdpa, trace_on
from hypothesis import given
from hypothesis import strategies as st
from test_padding_facts import (
    PROPERTY,
    check_plan,
    force_padded,
    key_padding_mask,
    rejected,
    rnd,
    why,
)

from hpuopt.passes.padding import PadSource, analyze_padding

aten = torch.ops.aten
DYN = {0: [0, 2], 1: [0, 2], 2: [0, 2], 3: [0, 1]}  # q, k, v: batch and length; mask: [B, S]


@pytest.fixture(autouse=True, scope="module")
def _efficient_kernel_on_cpu() -> None:
    cpu_kernel()


def _inputs(b: int, s: int, seed: int, left: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (rnd(b, 2, s, 8, gen=gen) for _ in range(3))
    return [q, k, v, key_padding_mask(b, s, gen, left=left)]


def _block(causal: bool, additive: bool, lse: bool = False) -> Any:
    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Any:
        m = device_mask(mask, causal, additive, q.dtype)
        return efficient_sdpa(q, k, v, attn_mask=m, lse=lse)

    return f


def device_mask(mask: torch.Tensor, causal: bool, additive: bool, dtype: torch.dtype
                ) -> torch.Tensor:
    """``attention_mask`` of ``test_padding_facts`` with its positions on the mask's device
    (transformers builds them so; a CPU index into a fake CUDA tensor cannot be traced)."""
    b, s = mask.shape
    batch_idx, kv_idx = (torch.arange(n, device=mask.device) for n in (b, s))
    # explicit ops: Python indexing of a fake CUDA tensor needs CUDA on a CPU build
    keep = aten.index.Tensor(mask, [batch_idx.unsqueeze(1), kv_idx.unsqueeze(0)])
    keep = keep.unsqueeze(1).unsqueeze(1)
    if causal:
        keep = keep & (kv_idx.unsqueeze(0) <= kv_idx.unsqueeze(1)).unsqueeze(0).unsqueeze(0)
    return torch.where(keep, 0.0, float("-inf")).to(dtype) if additive else keep


def _pads_alignment(gm: torch.fx.GraphModule) -> bool:
    return any(n.target is aten.constant_pad_nd.default for n in gm.graph.nodes)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
@pytest.mark.parametrize("causal", [False, True], ids=["padding", "causal+padding"])
def test_an_aligned_bias_keeps_batch_and_lengths_padded(causal: bool, additive: bool) -> None:
    inputs = _inputs(3, 7, seed=1, left=causal)
    for device in ("cuda", "cpu"):
        gm = trace_on(device, _block(causal, additive), inputs, DYN)
        assert _pads_alignment(gm)
        plan = analyze_padding(gm, DYN)
        assert plan.safe and plan.required_pad_value == 0.0, (device, why(plan))
        assert {(o.dim, o.source) for o in plan.outputs} == {(0, PadSource(0, 0)),
                                                             (2, PadSource(0, 2))}
    # buckets 16 (a multiple of the alignment: the graph pads 16 and cuts 16 back) and 12
    for extras in [(9, 9), (5, 1)]:
        check_plan(gm, plan, inputs, extras, seed=extras[0])


@PROPERTY
@given(b=st.integers(2, 4), s=st.integers(2, 20), causal=st.booleans(), additive=st.booleans(),
       extra=st.integers(1, 17), seed=st.integers(0, 10**6))
def test_aligned_bias_safe_verdicts_hold(b: int, s: int, causal: bool, additive: bool,
                                         extra: int, seed: int) -> None:
    inputs = _inputs(b, s, seed, left=causal)
    gm = trace_on("cpu", _block(causal, additive), inputs, DYN)
    plan = analyze_padding(gm, DYN)
    if s % ALIGN:  # traced at a multiple of 16, the composite does not pad at all
        assert _pads_alignment(gm)
    assert plan.safe, why(plan)
    check_plan(gm, plan, inputs, (extra, 3), seed=seed)


def test_a_read_logsumexp_refuses_the_query_length_only() -> None:
    """The logsumexp is computed (a backward needs it) and returned: its query dim has extent
    ``32 * ceil(L / 32)``, which no slice cuts back to ``L``. The query length runs exact; the
    batch and the key length stay padded."""
    inputs = _inputs(3, 7, seed=2)
    for device in ("cuda", "cpu"):
        gm = trace_on(device, _block(False, False, lse=True), inputs, DYN)
        plan = analyze_padding(gm, DYN)
        assert rejected(plan) >= {PadSource(0, 2)}, why(plan)
        assert "rounded up" in why(plan)
        assert {PadSource(i, 0) for i in range(4)} <= set(plan.padded)
        assert PadSource(1, 2) in plan.padded and PadSource(3, 1) in plan.padded
    check_plan(gm, plan, inputs, (5, 2), seed=3)
    real = gm(*inputs)[1]
    padded = force_padded(gm, [PadSource(0, 2)], inputs, 30, zeros=False)[1]
    assert real.shape[-1] != padded.shape[-1]  # 32 vs 64: no cut gives the real extent back


def _pad_then(cut: str) -> Any:
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        amount = ALIGN - s % ALIGN
        if cut == "none":
            return aten.constant_pad_nd(x, [0, amount], 1.0) * w
        if cut == "shifted":
            return aten.slice.Tensor(aten.constant_pad_nd(x, [0, amount], 1.0), 1, 1, s + 1) * w
        return aten.slice.Tensor(aten.constant_pad_nd(x, [amount, 0], 1.0), 1, 0, s) * w

    return f


@pytest.mark.parametrize("cut", ["none", "shifted", "front"])
def test_alignment_padding_that_is_not_cut_straight_back_is_unsafe(cut: str) -> None:
    gen = torch.Generator().manual_seed(4)
    x, w = rnd(3, 7, gen=gen), rnd(1, 1, gen=gen)
    gm = trace_on("cpu", _pad_then(cut), [x, w], {0: [1]})
    plan = analyze_padding(gm, {0: [1]})
    assert rejected(plan) == {PadSource(0, 1)}
    assert "constant_pad_nd" in why(plan)
    real = gm(x, w)
    padded = force_padded(gm, [PadSource(0, 1)], [x, w], 6, zeros=False)[0]
    width = real.shape[1]
    assert not torch.allclose(padded[:, :width], real)  # the real run's constants are not there
