"""Shape buckets: padding only where the analysis proves it safe, outputs sliced back, bounded
graph counts, and the right answer whatever the pad region holds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpuopt
from hpuopt import Config
from hpuopt.runtime.bucket_policy import BucketPolicy


def _policy(**options):
    return BucketPolicy(Config.from_options(options, environ={}))


def test_powers_of_two_and_waste_bound():
    p = _policy()
    assert [p.bucket(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert p.bucket(0) == 0  # empty stays empty
    strict = _policy(max_pad_waste=0.2)
    assert strict.bucket(5) == 5  # 8 would waste 3/8 > 0.2
    assert strict.bucket(7) == 8


def test_user_buckets_and_above_largest():
    p = _policy(bucket_sizes=[4, 16, 64])
    assert [p.bucket(n) for n in (1, 3, 4, 9, 40)] == [1, 4, 4, 16, 64]  # 1 -> 4 wastes 75%
    assert p.bucket(100) == 100  # above the largest: exact
    assert _policy(bucket_sizes=[4, 16], above_largest="uncaptured").bucket(17) is None


def _mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def test_varying_batch_uses_no_more_graphs_than_buckets():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True)
    kept = []
    with torch.no_grad():
        for batch in [3, 5, 7, 8, 2, 9, 16, 11, 13, 6]:
            x = torch.randn(batch, 8)
            out = compiled(x)
            torch.testing.assert_close(out, model(x))
            assert out.shape == (batch, 4)
            kept.append((x, out))
    for x, out in kept:  # outputs sliced and cloned: later replays did not touch them
        torch.testing.assert_close(out, model(x))
    (piece,) = [p for p in hpuopt.explain().pieces if p.captured and p.graphs]
    assert "pads" in piece.padding
    assert len(piece.graphs) <= 4  # buckets 2, 4, 8, 16 (batch 1 and 2 aside)
    assert 0 < hpuopt.counters.pad_waste < 0.5


def test_unsafe_piece_runs_at_exact_shapes_with_reason():
    def f(x):
        return torch.softmax(x, dim=0) * 2  # a softmax over the dynamic (batch) dim

    compiled = torch.compile(f, backend="hpugraph", dynamic=True)
    for batch in (3, 5, 6):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(compiled(x), f(x))
    (piece,) = [p for p in hpuopt.explain().pieces if p.captured]
    # dynamic=True makes the feature dim symbolic too: it may be padded, the batch may not
    assert "exact" in piece.padding and "softmax" in piece.padding
    assert len(piece.graphs) == 3


def test_reduction_over_padded_dim_uses_zero_padding():
    w = torch.randn(4, 4)

    def f(x):
        return (x @ w).sum(0)  # exact with zero padding only

    compiled = torch.compile(f, backend="hpugraph", dynamic=True)
    for batch in (3, 5, 7, 3):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(compiled(x), f(x))
    (piece,) = [p for p in hpuopt.explain().pieces if p.captured]
    assert "zero padding" in piece.padding


def test_above_largest_bucket_can_run_uncaptured():
    model = _mlp()
    compiled = torch.compile(
        model,
        backend="hpugraph",
        dynamic=True,
        options={"bucket_sizes": [4, 8], "above_largest": "uncaptured"},
    )
    with torch.no_grad(), hpuopt.counters.expect(uncaptured_runs=1):
        for batch in (3, 6, 20):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))


def test_padding_off_captures_exact_shapes():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True, options={"padding": False})
    with torch.no_grad():
        for batch in (3, 5, 6):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
    (piece,) = [p for p in hpuopt.explain().pieces if p.captured]
    assert len(piece.graphs) == 3 and not piece.padding


def test_training_with_padded_batches_matches_eager():
    model = _mlp()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph", dynamic=True)
    for batch in (3, 5, 7, 6):
        x, y = torch.randn(batch, 8), torch.randint(0, 4, (batch,))
        F.cross_entropy(compiled(x), y).backward()
        F.cross_entropy(ref(x), y).backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
            p.grad = q.grad = None
    kinds = {a.kind for g in hpuopt.explain().graphs for a in g.aot_graphs}
    assert {"forward", "backward"} <= kinds


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    buckets=st.lists(st.integers(1, 24), min_size=1, max_size=4, unique=True).map(sorted),
    batches=st.lists(st.integers(1, 24), min_size=2, max_size=6),
    waste=st.sampled_from([0.25, 0.5, 0.9]),
)
def test_any_buckets_and_sizes_give_eager_results(buckets, batches, waste):
    torch._dynamo.reset()
    model = _mlp()
    compiled = torch.compile(
        model,
        backend="hpugraph",
        dynamic=True,
        options={"bucket_sizes": buckets, "max_pad_waste": waste},
    )
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))


def test_dynamic_op_then_padded_piece(dynamic_op_flags):
    """The piece after a boolean mask sees data-dependent sizes and pads them."""
    lin = nn.Linear(6, 6)

    def f(x):
        h = lin(x)
        kept = h[h.sum(-1) > 0]
        return torch.tanh(kept) * 3

    compiled = torch.compile(f, backend="hpugraph")
    with torch.no_grad():
        for _ in range(8):
            x = torch.randn(12, 6)
            torch.testing.assert_close(compiled(x), f(x))
    pieces = [p for p in hpuopt.explain().pieces if p.captured]
    assert any(p.padding.startswith("pads") for p in pieces)


def test_a_reshape_to_sizes_passed_apart_is_not_padded():
    """``h.reshape(b, s, d)`` with ``b`` and ``s`` passed as their own arguments: they keep their
    real values, so a padded ``h`` would no longer fit them."""

    def f(h, b, s):
        return (h * 2).reshape(b, s, h.shape[-1])

    compiled = hpuopt.compile(f, dynamic=True)
    for b, s in [(2, 6), (1, 5), (3, 6), (1, 7)]:
        h = torch.randn(b * s, 32)
        torch.testing.assert_close(compiled(h, b, s), f(h, b, s))


def test_buckets_per_dim():
    """``dim_buckets`` gives the sequence dim its own buckets, beside powers of two elsewhere;
    the waste bound holds per dim (sequence 5 -> 16 would be 69% pad: exact)."""

    def f(x, m):
        return (x * m[..., None]).sum(1)

    compiled = hpuopt.compile(f, dynamic=True, dim_buckets={"seq": [16, 32]})
    for b, s in [(2, 17), (5, 30), (3, 9), (2, 20), (2, 5)]:
        x, m = torch.randn(b, s, 4), torch.randint(0, 2, (b, s)).float()
        torch.testing.assert_close(compiled(x, m), f(x, m))
    (piece,) = [p for p in compiled.explain().pieces if p.captured]
    assert "input 0 dim 1: buckets 16, 32" in piece.padding
    assert any("2x32" in g for g in piece.graphs) and any("4x16" in g for g in piece.graphs)
    assert any("2x5" in g for g in piece.graphs)
    assert len(piece.graphs) == 4  # (2, 20) replays the (2, 32) graph


def test_dim_buckets_entries_are_checked():
    from hpuopt.config import Config

    rules = Config.from_options({}, environ={"HPUOPT_DIM_BUCKETS": "seq:16,32;0:max=4"})
    assert rules.dim_bucket_rules() == {1: ((16, 32), 32), 0: ((), 4)}
    for bad in (["tokens:8"], ["seq:32,16"], ["batch:max=0"], ["seq"]):
        with pytest.raises(hpuopt.ConfigError, match="dim_buckets"):
            Config.from_options({"dim_buckets": bad}, environ={})


def test_an_output_cut_back_along_an_inner_dim_is_dense_like_eagers():
    """Padding the sequence of a [B, S, H] output and cutting it back leaves rows with the
    bucket's stride; the caller gets a dense tensor, as from eager, so ``view(-1, H)`` works."""

    def f(x, m):
        return torch.tanh(x) * m[..., None]

    compiled = hpuopt.compile(f, dynamic=True)
    for b, s in [(2, 5), (3, 7), (2, 6), (4, 13)]:
        x, m = torch.randn(b, s, 8), torch.randint(0, 2, (b, s)).float()
        out = compiled(x, m)
        torch.testing.assert_close(out, f(x, m))
        assert out.is_contiguous() and out.view(-1, 8).shape == (b * s, 8)
    assert any("dim 1" in p.padding for p in compiled.explain().pieces if p.captured)


def test_an_additive_mask_passed_in_is_padded_with_its_masking_value():
    """A float attention mask passed as an input (0 keeps a key, -inf drops it): the runtime
    fills its pad with -inf, so padding the key length leaves the real outputs as eager's."""

    def attend(q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    compiled = hpuopt.compile(attend, dynamic=True)
    gen = torch.Generator().manual_seed(12)
    for b, s in [(2, 5), (3, 7), (2, 6), (4, 11)]:
        q, k, v = (torch.randn(b, 2, s, 8, generator=gen) for _ in range(3))
        keep = torch.rand(b, s, generator=gen) > 0.3
        keep[:, 0] = True
        mask = torch.where(keep, 0.0, float("-inf"))[:, None, None, :]
        torch.testing.assert_close(compiled(q, k, v, mask), attend(q, k, v, mask))
    assert any("input 3 dim 3" in p.padding for p in compiled.explain().pieces if p.captured)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_inputs_pad_too(layout):
    """A padded input's layout does not matter: its real part is copied into a dense bucket."""
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for batch in [3, 5, 7, 6, 3]:
            if layout == "transposed":
                x = torch.randn(8, batch, generator=gen).t()
            elif layout == "sliced":
                x = torch.randn(batch, 16, generator=gen)[:, ::2]
            else:
                x = torch.randn(1, 8, generator=gen).expand(batch, 8)
            assert not x.is_contiguous()
            torch.testing.assert_close(compiled(x), model(x))
    pieces = [p for p in hpuopt.explain().pieces if p.captured and p.graphs]
    assert pieces and all("pads" in p.padding and "ran exact" not in p.padding for p in pieces)
    assert max(len(p.graphs) for p in pieces) <= 2  # buckets 4 and 8
