"""Property and hand-written tests of the padding analysis's newer facts: index facts (``arange``
gathers of a padded mask), fill facts (attention over masked pad keys, bool and additive masks),
merged padded dims (``[B, S, H] -> [B*S, H] -> [B, S, H']``), several padded dims at once,
positivity (RMS norms) and unbacked sizes.

Every plan the analysis calls safe runs padded per the plan (each tie group of sources padded to
its own bucket, random pad contents unless the plan needs zeros, size inputs set to the bucket)
and its sliced outputs must equal the unpadded run. The unsafe cases must stay unsafe for the
right source, and where it can be shown, padding them anyway changes the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from padding_helpers import DTYPE, pad_input
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import hpuopt
from hpuopt.passes.padding import PaddingPlan, PadSource, analyze_padding
from hpuopt.runtime.padder import slice_outputs

NEG_INF = float("-inf")
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------
# Tracing with chosen dynamic dims, padded runs per plan
# ------------------------------------------------------------------------------------------------


def trace_dims(fn: Callable[..., Any], inputs: Sequence[Any], dynamic: Mapping[int, Sequence[int]],
               duck: bool = True) -> torch.fx.GraphModule:
    """``make_fx`` with exactly the dims ``dynamic`` names symbolic (``{input: [dims]}``), the
    rest static, like a Dynamo graph whose batch and sequence vary. ``duck=False`` gives equal
    sizes of different inputs their own symbols (a mask and the ids it is gathered at)."""
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=duck))
    fakes = []
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            fakes.append(t)
            continue
        dims = [DimDynamic.DYNAMIC if d in dynamic.get(i, ()) else DimDynamic.STATIC
                for d in range(t.dim())]
        fakes.append(fake_mode.from_tensor(
            t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims)))
    with fake_mode:
        return make_fx(fn, tracing_mode="real")(*fakes)


def tie_groups(plan: PaddingPlan, inputs: Sequence[Any]) -> list[list[PadSource]]:
    """The padded sources grouped by ties and equal-size obligations, and by equal real sizes
    (the runtime's bucket policy gives equal sizes equal buckets): one bucket per group."""
    parent = {s: s for s in plan.padded}

    def root(s: PadSource) -> PadSource:
        while parent[s] != s:
            s = parent[s]
        return s

    pairs = list(plan.ties) + list(plan.equal_sizes)
    by_size: dict[int, PadSource] = {}
    for s in plan.padded:
        pairs.append((by_size.setdefault(int(inputs[s.input].shape[s.dim]), s), s))
    for a, b in pairs:
        if a in parent and b in parent and root(a) != root(b):
            parent[root(a)] = root(b)
    groups: dict[PadSource, list[PadSource]] = {}
    for s in plan.padded:
        groups.setdefault(root(s), []).append(s)
    return list(groups.values())


def padded_inputs(sources: Sequence[PadSource], groups: Sequence[Sequence[PadSource]],
                  inputs: Sequence[Any], extras: Sequence[int], zeros: bool,
                  seed: int) -> tuple[list[Any], dict[PadSource, int]]:
    gen = torch.Generator().manual_seed(seed)
    bucket: dict[PadSource, int] = {}
    for k, group in enumerate(groups):
        n = max(inputs[s.input].shape[s.dim] for s in group)
        for s in group:
            bucket[s] = n + extras[k % len(extras)]
    padded = list(inputs)
    for s in sources:
        padded[s.input] = pad_input(padded[s.input], s.dim, bucket[s], zeros, gen)
    return padded, bucket


def run_plan(gm: torch.fx.GraphModule, plan: PaddingPlan, inputs: Sequence[Any],
             extras: Sequence[int] = (3,), seed: int = 0) -> list[Any]:
    """Runs ``gm`` padded per ``plan``: each tie group to its own bucket (real size + an extra
    from ``extras``), random pad contents (zeros where the plan requires), size inputs set to
    their bucket; returns the outputs sliced back per the plan."""
    zeros = plan.required_pad_value == 0.0
    groups = tie_groups(plan, inputs)
    padded, bucket = padded_inputs(plan.padded, groups, inputs, extras, zeros, seed)
    for si in plan.size_inputs:
        padded[si.input] = bucket[si.source]
    for i in plan.positive_inputs:
        assert float(inputs[i]) > 0  # the runtime would run such a call exact
    out = gm(*padded)
    return slice_outputs(plan, list(out) if isinstance(out, (list, tuple)) else [out],
                         list(inputs), padded)


def check_plan(gm: torch.fx.GraphModule, plan: PaddingPlan, inputs: Sequence[Any],
               extras: Sequence[int] = (3,), seed: int = 0) -> None:
    """The padded run's sliced outputs equal the unpadded run's."""
    expected = gm(*inputs)
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    got = run_plan(gm, plan, inputs, extras, seed)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, equal_nan=True)


def force_padded(gm: torch.fx.GraphModule, sources: Sequence[PadSource], inputs: Sequence[Any],
                 extra: int, zeros: bool, seed: int = 0) -> list[Any]:
    """Runs ``gm`` with ``sources`` padded anyway (each source on its own, real size + extra)."""
    padded, _ = padded_inputs(sources, [[s] for s in sources], inputs, [extra], zeros, seed)
    out = gm(*padded)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def rejected(plan: PaddingPlan) -> set[PadSource]:
    return {v.source for v in plan.inputs if not v.safe}


def why(plan: PaddingPlan) -> str:
    return " | ".join(f"{r.op}: {r.why}" for r in plan.reasons)


def rnd(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def key_padding_mask(b: int, s: int, gen: torch.Generator, left: bool = False) -> torch.Tensor:
    """A boolean padding mask with a random number of pad tokens per row (left or right)."""
    mask = torch.ones(b, s, dtype=torch.bool)
    for row in range(b):
        n = int(torch.randint(0, s, (1,), generator=gen))
        if left:
            mask[row, :n] = False
        else:
            mask[row, s - n:] = False
    return mask


# ------------------------------------------------------------------------------------------------
# Graph builders (transformers-style masking code)
# ------------------------------------------------------------------------------------------------


def gathered_mask(mask: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """``padding_mask[batch_idx, kv_idx]`` as in transformers' masking utilities."""
    batch_idx = torch.arange(b)
    kv_idx = torch.arange(s)
    return mask[batch_idx[:, None], kv_idx[None, :]]


def attention_mask(mask: torch.Tensor, b: int, s: int, causal: bool,
                   additive: bool) -> torch.Tensor:
    """[B, 1, S, S] from a [B, S] padding mask: key padding, optionally causal (``kv <= q``),
    as bool or as an additive ``where(mask, 0, -inf)`` bias."""
    keep = gathered_mask(mask, b, s)[:, None, None, :]
    if causal:
        q_idx = torch.arange(s)
        kv_idx = torch.arange(s)
        keep = keep & (kv_idx[None, :] <= q_idx[:, None])[None, None]
    if additive:
        return torch.where(keep, 0.0, NEG_INF).to(DTYPE)
    return keep


def rms_norm(x: torch.Tensor, eps: Any = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def masked_attention(x: torch.Tensor, mask: torch.Tensor, wqkv: torch.Tensor, *, causal: bool,
                     additive: bool, norm: bool, heads: int, eps: Any = 1e-6,
                     ids: torch.Tensor | None = None) -> torch.Tensor:
    """A Llama-style block: (RMS norm), qkv projection through [B*S, E], attention with a
    padded mask gathered at arange positions (of ``ids`` when given), output projection back to
    [B, S, E]."""
    b, s, e = x.shape
    h = rms_norm(x, eps) if norm else x
    qkv = (h.reshape(b * s, e) @ wqkv).reshape(b, s, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    src = ids if ids is not None else x
    m = attention_mask(mask, src.shape[0], src.shape[1], causal, additive)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return o.transpose(1, 2).reshape(b, s, -1) + x


# ------------------------------------------------------------------------------------------------
# (a) safe verdicts hold: hand-written graphs
# ------------------------------------------------------------------------------------------------


def test_arange_gather_of_a_padded_mask_pads_both_dims() -> None:
    gen = torch.Generator().manual_seed(0)
    mask, x = key_padding_mask(3, 5, gen), rnd(3, 5, gen=gen)

    def f(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m = gathered_mask(mask, mask.shape[0], mask.shape[1])
        return torch.where(m, x, 0.0) * 2

    dyn = {0: [0, 1], 1: [0, 1]}
    gm = trace_dims(f, [mask, x], dyn)
    plan = analyze_padding(gm, dyn, allow_zero_pad=False)
    assert plan.safe, why(plan)
    assert {(o.dim, o.source.dim) for o in plan.outputs} == {(0, 0), (1, 1)}
    for extras in [(1, 4), (5, 2), (3, 3)]:
        check_plan(gm, plan, [mask, x], extras, seed=extras[0])


def test_arange_gather_at_a_second_inputs_positions_requires_equal_sizes() -> None:
    """``mask[arange(B), arange(S_ids)]`` with the mask's own size symbols: the gather is
    position-preserving only while the sizes agree, which the plan records as obligations."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (3, 5), generator=gen)
    mask, x = key_padding_mask(3, 5, gen), rnd(3, 5, gen=gen)

    def f(ids: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m = gathered_mask(mask, ids.shape[0], ids.shape[1])
        return torch.where(m, x, 0.0) + ids

    dyn = {0: [0, 1], 1: [0, 1], 2: [0, 1]}
    gm = trace_dims(f, [ids, mask, x], dyn, duck=False)
    plan = analyze_padding(gm, dyn)
    assert plan.safe, why(plan)
    pairs = {frozenset(p) for p in plan.equal_sizes}
    assert pairs == {frozenset({PadSource(0, 0), PadSource(1, 0)}),
                     frozenset({PadSource(0, 1), PadSource(1, 1)})}
    check_plan(gm, plan, [ids, mask, x], (2, 5), seed=3)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
@pytest.mark.parametrize("causal", [False, True], ids=["padding", "causal+padding"])
def test_masked_attention_pads_batch_and_keys(causal: bool, additive: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    b, s, heads, d = 3, 7, 2, 4
    q, k, v = (rnd(b, heads, s, d, gen=gen) for _ in range(3))
    mask = key_padding_mask(b, s, gen, left=causal)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask(mask, mask.shape[0], mask.shape[1], causal, additive)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    dyn = {0: [0, 2], 1: [0, 2], 2: [0, 2], 3: [0, 1]}
    gm = trace_dims(f, [q, k, v, mask], dyn)
    plan = analyze_padding(gm, dyn)
    assert plan.safe and plan.required_pad_value == 0.0, why(plan)
    check_plan(gm, plan, [q, k, v, mask], (2, 5), seed=4)


@pytest.mark.parametrize("eps_input", [False, True], ids=["eps-constant", "eps-input"])
def test_rms_norm_before_masked_attention(eps_input: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    b, s, e, heads = 2, 6, 8, 2
    x, w = rnd(b, s, e, gen=gen), rnd(e, 3 * e, gen=gen)
    mask = key_padding_mask(b, s, gen)
    eps = torch.tensor(1e-6, dtype=DTYPE)

    def f(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return masked_attention(x, mask, w, causal=True, additive=False, norm=True, heads=heads,
                                eps=eps if eps_input else 1e-6)

    dyn = {0: [0, 1], 1: [0, 1]}
    gm = trace_dims(f, [x, mask, w, eps], dyn)
    plan = analyze_padding(gm, dyn)
    assert plan.safe, why(plan)
    assert plan.positive_inputs == ((3,) if eps_input else ())
    check_plan(gm, plan, [x, mask, w, eps], (3, 1), seed=5)


def test_linear_through_merged_batch_and_sequence_keeps_both_padded_dims() -> None:
    gen = torch.Generator().manual_seed(4)
    x, w1, w2 = rnd(3, 5, 4, gen=gen), rnd(4, 6, gen=gen), rnd(6, 4, gen=gen)

    def f(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        y = F.gelu(x.reshape(b * s, h) @ w1)
        y = torch.softmax(y, -1) @ w2
        return F.layer_norm(y.reshape(b, s, -1), (4,)) + x

    dyn = {0: [0, 1]}
    gm = trace_dims(f, [x, w1, w2], dyn)
    plan = analyze_padding(gm, dyn, allow_zero_pad=False)
    assert plan.safe, why(plan)
    check_plan(gm, plan, [x, w1, w2], (1, 6), seed=6)


def test_three_padded_dims_at_once() -> None:
    """[B, S, T] padded along all three dims (a batch of key/query score grids)."""
    gen = torch.Generator().manual_seed(5)
    x, y = rnd(2, 3, 5, gen=gen), rnd(2, 5, 4, gen=gen)

    def f(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(x) * x.sigmoid() + torch.softmax(y, -1).sum(-1)[:, None, :]
        return z, torch.bmm(x.relu(), y) + (x * x).sum(-1, keepdim=True)

    dyn = {0: [0, 1, 2], 1: [0, 1]}
    gm = trace_dims(f, [x, y], dyn)
    plan = analyze_padding(gm, dyn)
    assert plan.safe and plan.required_pad_value == 0.0, why(plan)
    assert len({(o.output, o.dim) for o in plan.outputs}) == 5
    check_plan(gm, plan, [x, y], (2, 3, 1), seed=7)


# ------------------------------------------------------------------------------------------------
# (a) safe verdicts hold: properties over random sizes, buckets and pad contents
# ------------------------------------------------------------------------------------------------


@PROPERTY
@given(b=st.sampled_from([2, 3]), s=st.sampled_from([5, 6, 7]), causal=st.booleans(),
       additive=st.booleans(), norm=st.booleans(), eps_input=st.booleans(), left=st.booleans(),
       second_input=st.booleans(), extras=st.lists(st.integers(1, 6), min_size=2, max_size=3),
       seed=st.integers(0, 2**16))
def test_masked_attention_block_safe_verdicts_hold(b: int, s: int, causal: bool, additive: bool,
                                                   norm: bool, eps_input: bool, left: bool,
                                                   second_input: bool, extras: list[int],
                                                   seed: int) -> None:
    """RMS norm, [B*S, E] projections, a transformers-style gathered mask (index extent from the
    same input, or from ``ids`` of equal sizes), attention, with batch and sequence padded."""
    gen = torch.Generator().manual_seed(seed)
    e, heads = 8, 2
    x, w = rnd(b, s, e, gen=gen), rnd(e, 3 * e, gen=gen)
    mask = key_padding_mask(b, s, gen, left=left)
    ids = torch.randint(0, 50, (b, s), generator=gen)
    eps = torch.tensor(1e-5, dtype=DTYPE)

    def f(x: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
          eps: torch.Tensor) -> torch.Tensor:
        return masked_attention(x, mask, w, causal=causal, additive=additive, norm=norm,
                                heads=heads, eps=eps if eps_input else 1e-5,
                                ids=ids if second_input else None)

    dyn = {0: [0, 1], 1: [0, 1], 2: [0, 1]}
    inputs = [x, mask, ids, w, eps]
    gm = trace_dims(f, inputs, dyn, duck=not second_input)
    plan = analyze_padding(gm, dyn)
    assert plan.safe, why(plan)  # completeness: these are what the new facts are for
    if second_input:
        assert plan.equal_sizes
    check_plan(gm, plan, inputs, extras, seed)


Block = Callable[[torch.Tensor, Callable[[tuple[int, ...]], torch.Tensor]], torch.Tensor]


def _merged_linear(h: torch.Tensor, p: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    b, s, e = h.shape
    return (h.reshape(b * s, e) @ p((e, e))).reshape(b, s, e)


def _flatten_rows(h: torch.Tensor, p: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    b, s, e = h.shape
    return torch.softmax(h.reshape(-1, e) * 2, -1).view(b, s, e)


BLOCKS: list[tuple[str, Block, bool]] = [  # name, block, safe for any pad contents
    ("merged_linear", _merged_linear, True),
    ("linear_3d", lambda h, p: F.linear(h, p((8, 8)), p((8,))), True),
    ("flatten_rows_softmax", _flatten_rows, True),
    ("rms_norm", lambda h, p: rms_norm(h) * p((8,)), True),
    ("layer_norm", lambda h, p: F.layer_norm(h, (8,), p((8,)), p((8,))), True),
    ("gelu", lambda h, p: F.gelu(h), True),
    ("silu_gate", lambda h, p: F.silu(h) * torch.tanh(h), True),
    ("first_token", lambda h, p: h + h[:, :1], True),
    ("cumsum_seq", lambda h, p: torch.cumsum(h, 1) * 0.1, True),
    ("sum_seq", lambda h, p: h + h.sum(1, keepdim=True), False),  # zero pad only
    ("softmax_seq", lambda h, p: torch.softmax(h, 1), False),
    ("mean_batch", lambda h, p: h - h.mean(0), False),
    ("flip_seq", lambda h, p: h.flip(1), False),
    ("rsqrt_no_eps", lambda h, p: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)), False),
]


@PROPERTY
@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
       b=st.sampled_from([2, 3]), s=st.sampled_from([4, 5, 7]),
       extras=st.lists(st.integers(1, 5), min_size=2, max_size=2),
       any_pad=st.booleans(), seed=st.integers(0, 2**16))
def test_two_padded_dims_safe_verdicts_hold(blocks: list[tuple[str, Block, bool]], b: int, s: int,
                                            extras: list[int], any_pad: bool, seed: int) -> None:
    """Random stacks of row-wise blocks over [B, S, E], B and S padded at once (to their own
    buckets); with ``allow_zero_pad=False`` the verdict holds for any pad contents."""
    gen = torch.Generator().manual_seed(seed)
    params: list[torch.Tensor] = []

    def record(shape: tuple[int, ...]) -> torch.Tensor:
        params.append(rnd(*shape, gen=gen))
        return params[-1]

    def body(x: torch.Tensor, p: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        for _, block, _ in blocks:
            x = block(x, p)
        return x

    x = rnd(b, s, 8, gen=gen)
    body(x, record)

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        it = iter(ps)
        return body(x, lambda shape: next(it))

    gm = trace_dims(f, [x, *params], {0: [0, 1]})
    plan = analyze_padding(gm, {0: [0, 1]}, allow_zero_pad=not any_pad)
    if all(safe for _, _, safe in blocks):
        assert plan.safe and plan.required_pad_value is None, why(plan)
    if plan.padded:
        check_plan(gm, plan, [x, *params], extras, seed)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), norm_eps=st.sampled_from([1e-6, 1e-3]))
def test_unbacked_row_counts_are_padded_and_match_eager(seed: int, norm_eps: float) -> None:
    """Rows kept by a boolean mask (an unbacked, data-dependent count, like an expert's tokens)
    feed a piece of row-wise ops: it is padded to buckets of the count and matches eager."""
    torch.manual_seed(seed)
    lin1, lin2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def f(x: torch.Tensor) -> torch.Tensor:
        kept = x[x[:, 0] > 0]
        h = F.silu(lin1(rms_norm(kept, norm_eps)))
        return torch.softmax(lin2(h), -1) * 2

    compiled = hpuopt.compile(f)
    gen = torch.Generator().manual_seed(seed)
    counts = set()
    with torch.no_grad():
        for _ in range(6):
            x = torch.randn(int(torch.randint(6, 24, (1,), generator=gen)), 8, generator=gen)
            counts.add(int((x[:, 0] > 0).sum()))
            torch.testing.assert_close(compiled(x), f(x))
    pieces = [p for p in compiled.explain().pieces if p.captured and p.graphs]
    assert any(p.padding.startswith("pads") for p in pieces), [p.padding for p in pieces]


# ------------------------------------------------------------------------------------------------
# (b) unsafe cases stay unsafe (and padding them anyway changes the result)
# ------------------------------------------------------------------------------------------------


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or not torch.allclose(a, b, equal_nan=False)


def test_attention_over_padded_keys_without_a_mask_is_unsafe() -> None:
    gen = torch.Generator().manual_seed(10)
    q, k, v = (rnd(2, 3, 5, 4, gen=gen) for _ in range(3))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    dyn = {0: [0, 2], 1: [0, 2], 2: [0, 2]}
    gm = trace_dims(f, [q, k, v], dyn)
    plan = analyze_padding(gm, dyn)
    assert {PadSource(1, 2), PadSource(2, 2)} <= rejected(plan), why(plan)
    assert "padded key length" in why(plan)
    keys = [PadSource(1, 2), PadSource(2, 2)]
    (out,) = force_padded(gm, keys, [q, k, v], 3, zeros=True)
    assert _differs(out, f(q, k, v))  # zero keys still take softmax weight


def test_a_mask_true_in_the_key_pad_is_unsafe() -> None:
    """``logical_not`` of a zero-padded "is pad" mask used directly: its key pad is True."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (rnd(2, 3, 5, 4, gen=gen) for _ in range(3))
    is_pad = ~key_padding_mask(2, 5, gen)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
        m = gathered_mask(is_pad, is_pad.shape[0], is_pad.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.logical_not(m)[:, None,
                                                                                      None, :])

    dyn = {0: [0, 2], 1: [0, 2], 2: [0, 2], 3: [0, 1]}
    gm = trace_dims(f, [q, k, v, is_pad], dyn)
    plan = analyze_padding(gm, dyn)
    assert {PadSource(1, 2), PadSource(2, 2), PadSource(3, 1)} <= rejected(plan), why(plan)
    assert "does not mask every pad key" in why(plan)
    keys = [PadSource(1, 2), PadSource(2, 2), PadSource(3, 1)]
    (out,) = force_padded(gm, keys, [q, k, v, is_pad], 3, zeros=True)
    assert _differs(out, f(q, k, v, is_pad))


@pytest.mark.parametrize("index", [
    pytest.param(lambda s: (torch.arange(s) + 1) % s, id="arange+1"),
    pytest.param(lambda s: torch.arange(s).flip(0), id="flip"),
])
def test_gathers_at_positions_that_are_not_arange_are_unsafe(
        index: Callable[[Any], torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(12)
    x = rnd(3, 6, gen=gen)

    def f(x: torch.Tensor) -> torch.Tensor:
        return x[torch.arange(x.shape[0])[:, None], index(x.shape[1])[None, :]] * 2

    gm = trace_dims(f, [x], {0: [0, 1]})
    plan = analyze_padding(gm, {0: [0, 1]})
    assert PadSource(0, 1) in rejected(plan), why(plan)
    (out,) = force_padded(gm, [PadSource(0, 1)], [x], 2, zeros=True)
    assert _differs(out[:, :6], f(x))


def test_an_output_carrying_a_merged_dim_is_unsafe() -> None:
    gen = torch.Generator().manual_seed(13)
    x, w = rnd(3, 5, 4, gen=gen), rnd(4, 6, gen=gen)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[2]) @ w

    gm = trace_dims(f, [x, w], {0: [0, 1]})
    plan = analyze_padding(gm, {0: [0, 1]})
    assert PadSource(0, 1) in rejected(plan), why(plan)
    assert any(r.op == "output" and "merges padded dims" in r.why for r in plan.reasons)
    (out,) = force_padded(gm, [PadSource(0, 0), PadSource(0, 1)], [x, w], 2, zeros=False)
    assert _differs(out[:15], f(x, w))  # pad rows interleave: no prefix is the real result


def test_a_reshape_to_sizes_passed_as_inputs_is_unsafe() -> None:
    gen = torch.Generator().manual_seed(14)
    h = rnd(15, 4, gen=gen)

    def f(h: torch.Tensor, b: Any, s: Any) -> torch.Tensor:
        return (h * 2).reshape(b, s, h.shape[1]).relu()

    gm = make_fx(f, tracing_mode="symbolic")(h, 3, 5)
    plan = analyze_padding(gm, {0: 0})
    assert not plan.safe and PadSource(0, 0) in rejected(plan), why(plan)
    assert "reshape" in why(plan) or "size argument" in why(plan)
    with pytest.raises(RuntimeError):  # the padded rows no longer fit the real sizes
        force_padded(gm, [PadSource(0, 0)], [h, 3, 5], 4, zeros=True)


def test_rsqrt_without_eps_before_masked_attention_is_unsafe() -> None:
    """``rsqrt(mean(x ** 2))`` is infinite on zero pad rows; 0 × inf poisons the attention."""
    gen = torch.Generator().manual_seed(15)
    x, w = rnd(2, 6, 8, gen=gen), rnd(8, 24, gen=gen)
    mask = key_padding_mask(2, 6, gen)

    def f(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return masked_attention(x, mask, w, causal=True, additive=False, norm=True, heads=2,
                                eps=0.0)

    def g(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
        return masked_attention(h, mask, w, causal=True, additive=False, norm=False, heads=2)

    dyn = {0: [0, 1], 1: [0, 1]}
    for fn in (f, g):
        gm = trace_dims(fn, [x, mask, w], dyn)
        plan = analyze_padding(gm, dyn)
        assert PadSource(0, 1) in rejected(plan), why(plan)
        assert "finite in the pad" in why(plan) or "finite" in why(plan)
        (out,) = force_padded(gm, [PadSource(0, 1), PadSource(1, 1)], [x, mask, w], 2,
                              zeros=True)
        assert torch.isnan(out[:, :6]).any() and not torch.isnan(fn(x, mask, w)).any()


def test_outer_sum_reduced_over_the_other_operands_dim_is_unsafe() -> None:
    """``x[:, None] + y[None, :]`` is padded along both dims; summing over dim 1 (y's) reads
    the pad of the result, where x brings its real values: not zero even with zero padding."""
    gen = torch.Generator().manual_seed(16)
    x, y = rnd(5, gen=gen), rnd(7, gen=gen)

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x[:, None] + y[None, :]).sum(1)

    dyn = {0: [0], 1: [0]}
    gm = trace_dims(f, [x, y], dyn, duck=False)
    plan = analyze_padding(gm, dyn)
    assert PadSource(1, 0) in rejected(plan), why(plan)
    assert PadSource(0, 0) in plan.padded
    (out,) = force_padded(gm, [PadSource(1, 0)], [x, y], 3, zeros=True)
    assert _differs(out, f(x, y))


UNSAFE_BUILDERS: dict[str, tuple[Callable[..., Any], set[int]]] = {
    # name: (fn(q, k, v, mask), input indices whose dim must be rejected)
    "no_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v), {1, 2}),
    "mask_true_in_pad": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.logical_not(~m)[:, None, None, :] | ~m[:, None, None, :]),
        {1, 2, 3}),
    "bias_zero_in_pad": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.where(~m, 0.0, NEG_INF).to(DTYPE)[:, None, None, :]), {1, 2, 3}),
    "flip_gather": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m[:, torch.arange(m.shape[1]).flip(0)][:, None, None, :]), {1, 2, 3}),
}


@PROPERTY
@given(name=st.sampled_from(sorted(UNSAFE_BUILDERS)), b=st.sampled_from([2, 3]),
       s=st.sampled_from([5, 6, 7]), seed=st.integers(0, 2**16))
def test_unsafe_masking_stays_unsafe(name: str, b: int, s: int, seed: int) -> None:
    """Over random sizes, attention whose mask leaves a pad key unmasked is not padded along the
    key length (the keys', values' and mask's sequence dims), whatever else is."""
    gen = torch.Generator().manual_seed(seed)
    fn, bad = UNSAFE_BUILDERS[name]
    q, k, v = (rnd(b, 4, s, 4, gen=gen) for _ in range(3))
    mask = key_padding_mask(b, s, gen)
    dyn = {0: [0, 2], 1: [0, 2], 2: [0, 2], 3: [0, 1]}
    gm = trace_dims(fn, [q, k, v, mask], dyn)
    plan = analyze_padding(gm, dyn)
    key_dims = {PadSource(i, 1 if i == 3 else 2) for i in bad}
    assert key_dims <= rejected(plan), why(plan)
    if plan.padded:
        check_plan(gm, plan, [q, k, v, mask], [2], seed)


# ------------------------------------------------------------------------------------------------
# Soundness bugs found: the analysis calls these safe, padding them changes the result
# ------------------------------------------------------------------------------------------------

_MERGED_POSITIONAL = {
    # position-dependent ops on [B*S, H] with S padded: real rows sit at other positions there
    "cumsum": lambda x: x.reshape(-1, x.shape[2]).cumsum(0).reshape(x.shape),
    "cummax": lambda x: x.reshape(-1, x.shape[2]).cummax(0).values.reshape(x.shape),
    "select": lambda x: x.reshape(-1, x.shape[2])[6] * 2,
    "slice": lambda x: x.reshape(-1, x.shape[2])[:7] * 2,
    "tril": lambda x: x.reshape(-1, x.shape[2]).tril().reshape(x.shape),
    "index_select": lambda x: x.reshape(-1, x.shape[2]).index_select(
        0, torch.tensor([0, 5, 6])) * 2,
    "cat": lambda x: torch.cat([x.new_ones(2, x.shape[2]), x.reshape(-1, x.shape[2])], 0) * 2,
}


@pytest.mark.parametrize("name", sorted(_MERGED_POSITIONAL))
def test_position_dependent_ops_on_a_merged_padded_dim(name: str) -> None:
    fn = _MERGED_POSITIONAL[name]
    x = rnd(3, 5, 8, gen=torch.Generator().manual_seed(20))
    gm = trace_dims(fn, [x], {0: [0, 1]})
    plan = analyze_padding(gm, {0: [0, 1]})
    assert not plan.verdict(0, 1).safe  # the inner dim would move the real positions
    check_plan(gm, plan, [x], (3, 2), seed=1)  # what it does pad stays exact


def test_an_arange_narrowed_to_int8_is_not_an_index_fact() -> None:
    gen = torch.Generator().manual_seed(21)
    n = 100
    q, k, v = (rnd(1, 1, n, 4, gen=gen) for _ in range(3))
    mask = key_padding_mask(1, n, gen)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kv_idx = torch.arange(mask.shape[1]).to(torch.int8).long()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, kv_idx][:, None, None])

    dyn = {0: [2], 1: [2], 2: [2], 3: [1]}
    gm = trace_dims(f, [q, k, v, mask], dyn)
    plan = analyze_padding(gm, dyn)
    assert not plan.safe  # bucket 200: positions 128..199 would wrap onto real mask columns
    check_plan(gm, plan, [q, k, v, mask], (100,), seed=2)


# ------------------------------------------------------------------------------------------------
# Runtime: hpuopt.compile on an attention block with a padded mask
# ------------------------------------------------------------------------------------------------


class _MaskedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s = ids.shape
        h = self.emb(ids)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        q, k, v = self.qkv(h).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        batch_idx, kv_idx = torch.arange(b), torch.arange(s)
        keep = mask.bool()[batch_idx[:, None], kv_idx[None, :]]
        keep = keep[:, None, None, :] & (kv_idx[None, :] <= kv_idx[:, None])[None, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(o.transpose(1, 2).reshape(b, s, 16))


def test_compiled_attention_with_a_padded_mask_pads_batch_and_sequence() -> None:
    model = _MaskedBlock().eval()
    compiled = hpuopt.compile(model, dynamic=True)
    shapes = [(2, 5), (3, 7), (4, 3), (2, 9), (3, 6), (4, 11), (2, 7)]
    gen = torch.Generator().manual_seed(30)
    with torch.no_grad():
        for k, (b, s) in enumerate(shapes):
            ids = torch.randint(0, 50, (b, s), generator=gen)
            mask = key_padding_mask(b, s, gen, left=k % 2 == 0).long()
            out = compiled(ids, mask)
            assert out.shape == (b, s, 16)
            real = mask.bool()
            torch.testing.assert_close(out[real], model(ids, mask)[real])
    pieces = [p for p in compiled.explain().pieces if p.captured and p.graphs]
    (piece,) = [p for p in pieces if len(p.graphs) > 1]
    assert piece.padding.startswith("pads") and "zero padding" in piece.padding
    assert {"ids dim 0", "ids dim 1"} <= set(piece.padded), piece.padding
    buckets = {(1 << (b - 1).bit_length(), 1 << (s - 1).bit_length()) for b, s in shapes}
    assert len(piece.graphs) <= len(buckets) < len(shapes)


def test_an_additive_mask_input_is_padded_with_minus_infinity() -> None:
    """A float mask passed in (0 for a real key, -inf for a masked one), padded along the key
    length: its pad must mask the pad keys, so the plan asks the runtime to fill it with -inf;
    padded that way the real outputs equal the unpadded run's."""
    gen = torch.Generator().manual_seed(31)
    b, s = 2, 6
    q, k, v = (rnd(b, 2, s, 4, gen=gen) for _ in range(3))
    keep = key_padding_mask(b, s, gen)
    mask = torch.where(keep, 0.0, NEG_INF).to(DTYPE)[:, None, None, :]

    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    dyn = {0: [2], 1: [2], 2: [2], 3: [3]}
    gm = trace_dims(f, [q, k, v, mask], dyn)
    plan = analyze_padding(gm, dyn)
    assert plan.safe and plan.mask_inputs == (3,), why(plan)
    padded = [torch.cat([t, rnd(*t.shape[:2], 3, t.shape[3], gen=gen)], 2) for t in (q, k, v)]
    padded.append(torch.cat([mask, torch.full((b, 1, 1, 3), NEG_INF, dtype=DTYPE)], 3))
    torch.testing.assert_close(gm(*padded)[:, :, :s], gm(q, k, v, mask))
    zero_pad = torch.cat([mask, torch.zeros(b, 1, 1, 3, dtype=DTYPE)], 3)  # what zeros would do
    assert not torch.allclose(gm(*padded[:3], zero_pad)[:, :, :s], gm(q, k, v, mask))
