"""Tests of the padding-safety analysis (``hpuopt.passes.padding``).

The property tests build random pieces with ``make_fx``, ask the analysis, and whenever it says
*safe* they run the graph on inputs padded with random contents (zeros only where the plan
requires pad value 0), slice the outputs back per the plan and compare with the unpadded run.
The hand-written cases pin the reasons of the unsafe verdicts and the shapes of safe plans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from hpuopt.config import Config
from hpuopt.passes.base import PassResult
from hpuopt.passes.padding import PaddingAnalysisPass, analyze_padding
from hpuopt.records import OutputDim, PaddingPlan, PadSource
from hpuopt.runtime.padder import slice_outputs

DTYPE = torch.float64  # exact enough that kernels picked for another shape compare tightly


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def trace(fn: Callable[..., Any], *inputs: Any, mode: str = "symbolic") -> torch.fx.GraphModule:
    """``make_fx`` in ``mode``; ``"dynamic_batch"`` makes only dim 0 of input 0 symbolic, the
    other dims static, like a Dynamo graph with a dynamic batch (``make_fx(tracing_mode=
    "symbolic")`` makes every dim of every input symbolic, weights included)."""
    if mode != "dynamic_batch":
        return make_fx(fn, tracing_mode=mode)(*inputs)
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(t: Any, dynamic: bool) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        dims = [DimDynamic.DYNAMIC if dynamic and d == 0 else DimDynamic.STATIC
                for d in range(t.dim())]
        return fake_mode.from_tensor(
            t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims)
        )

    fakes = [fake(t, i == 0) for i, t in enumerate(inputs)]
    with fake_mode:
        return make_fx(fn, tracing_mode="real")(*fakes)


def pad_input(x: torch.Tensor, dim: int, size: int, zeros: bool,
              gen: torch.Generator) -> torch.Tensor:
    extra = list(x.shape)
    extra[dim] = size - x.shape[dim]
    if zeros:
        fill = torch.zeros(extra, dtype=x.dtype)
    elif x.is_floating_point():
        fill = torch.randn(extra, generator=gen, dtype=x.dtype) * 3
    else:
        fill = torch.randint(-(10**6), 10**6, extra, generator=gen, dtype=x.dtype)
    return torch.cat([x, fill], dim)


def check_padded_run(gm: torch.fx.GraphModule, plan: PaddingPlan, inputs: Sequence[Any],
                     bucket: int, seed: int = 0) -> None:
    """Runs ``gm`` padded per ``plan`` and checks the sliced outputs equal the unpadded run."""
    gen = torch.Generator().manual_seed(seed)
    zeros = plan.required_pad_value == 0.0
    padded = list(inputs)
    for src in plan.padded:
        padded[src.input] = pad_input(padded[src.input], src.dim, bucket, zeros, gen)
    expected = _as_list(gm(*inputs))
    got = slice_outputs(plan, _as_list(gm(*padded)), list(inputs), padded)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, equal_nan=True)


def _as_list(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def reason_ops(plan: PaddingPlan) -> list[str]:
    return [r.op for r in plan.reasons]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------------------------
# Random pieces
# ------------------------------------------------------------------------------------------------

Param = Callable[[tuple[int, ...]], torch.Tensor]
OpFn = Callable[[torch.Tensor, int, Param], tuple[torch.Tensor, int]]


@dataclasses.dataclass(frozen=True)
class PieceOp:
    name: str
    fn: OpFn
    safe: bool  # safe for arbitrary pad contents (the analysis must then say safe)


def _linear(h: torch.Tensor, c: int, p: Param) -> tuple[torch.Tensor, int]:
    out = 6 if c == 4 else 4
    return F.linear(h, p((out, c)), p((out,))), out


def _mm(h: torch.Tensor, c: int, p: Param) -> tuple[torch.Tensor, int]:
    out = 6 if c == 4 else 4
    return h @ p((c, out)), out


def _split_last(h: torch.Tensor, c: int, p: Param) -> tuple[torch.Tensor, int]:
    return h.reshape(-1, 2, c // 2).transpose(1, 2).relu().reshape(-1, c), c


def _merge_rows(h: torch.Tensor, c: int, p: Param) -> tuple[torch.Tensor, int]:
    return (h.reshape(-1, 2) * p((2,))).reshape(-1, c), c


def _outer_sum(h: torch.Tensor, c: int, p: Param) -> tuple[torch.Tensor, int]:
    return (h.unsqueeze(1) * h.unsqueeze(2)).sum(1), c


SAFE_OPS = [
    PieceOp("relu", lambda h, c, p: (h.relu(), c), True),
    PieceOp("gelu", lambda h, c, p: (F.gelu(h), c), True),
    PieceOp("tanh", lambda h, c, p: (torch.tanh(h), c), True),
    PieceOp("exp", lambda h, c, p: (torch.exp(h.clamp(max=5)), c), True),
    PieceOp("mul_self", lambda h, c, p: (h * h, c), True),
    PieceOp("add_bias", lambda h, c, p: (h + p((c,)), c), True),
    PieceOp("linear", _linear, True),
    PieceOp("mm", _mm, True),
    PieceOp("layer_norm", lambda h, c, p: (F.layer_norm(h, (c,), p((c,)), p((c,))), c), True),
    PieceOp("softmax_last", lambda h, c, p: (torch.softmax(h, -1), c), True),
    PieceOp("log_softmax_last", lambda h, c, p: (torch.log_softmax(h, -1), c), True),
    PieceOp("center_last", lambda h, c, p: (h - h.mean(-1, keepdim=True), c), True),
    PieceOp("rms_last", lambda h, c, p: (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6),
                                         c), True),
    PieceOp("split_last_transpose", _split_last, True),
    PieceOp("merge_rows", _merge_rows, True),
    PieceOp("transpose_rows", lambda h, c, p: (h.t().sigmoid().t(), c), True),
    PieceOp("outer_sum", _outer_sum, True),
    PieceOp("cumsum_padded", lambda h, c, p: (torch.cumsum(h, 0), c), True),
    PieceOp("amax_last", lambda h, c, p: (h - h.amax(-1, keepdim=True), c), True),
    PieceOp("first_row", lambda h, c, p: (h + h[0], c), True),  # index 0 is always real
    PieceOp("row_mean_expand", lambda h, c, p: (h.mean(1, keepdim=True).expand_as(h) * h, c),
            True),
    PieceOp("cat_prefix", lambda h, c, p: (torch.cat([p((2, c)), h], 0), c), True),
    PieceOp("cat_features", lambda h, c, p: (torch.cat([h, h.relu()], 1)[:, :c] * 2, c), True),
    PieceOp("where_pos", lambda h, c, p: (torch.where(h > 0, h, 0.5 * h), c), True),
    PieceOp("gather_fixed_rows", lambda h, c, p: (h.index_select(0, torch.tensor([0, 1, 0])), c),
            True),
    PieceOp("zeros_rows", lambda h, c, p: (h + h.new_zeros(h.shape[0], c), c), True),
    PieceOp("inplace_mid", lambda h, c, p: ((h * 1).add_(1), c), True),
]

UNSAFE_OPS = [
    PieceOp("softmax_padded", lambda h, c, p: (torch.softmax(h, 0), c), False),
    PieceOp("mean_padded", lambda h, c, p: (h - h.mean(0), c), False),
    PieceOp("sum_padded", lambda h, c, p: (h + h.sum(0), c), False),  # exact only with zero pad
    PieceOp("gram", lambda h, c, p: (h @ (h.t() @ h) * 0.1, c), False),  # zero pad only
    PieceOp("amax_padded", lambda h, c, p: (h - h.amax(0), c), False),
    PieceOp("div_size", lambda h, c, p: (h / h.shape[0], c), False),
    PieceOp("sort_padded", lambda h, c, p: (h.sort(0).values, c), False),
    PieceOp("flip_padded", lambda h, c, p: (h.flip(0), c), False),
    PieceOp("last_row", lambda h, c, p: (h + h[-1], c), False),
    PieceOp("roll_padded", lambda h, c, p: (h.roll(1, 0), c), False),
    PieceOp("merged_reduce", lambda h, c, p: (h + h.reshape(-1).amax(), c), False),
    PieceOp("slice_from_1", lambda h, c, p: (h[1:], c), False),
    PieceOp("pad_rows", lambda h, c, p: (F.pad(h, (0, 0, 0, 2), value=1.0), c), False),
    PieceOp("cat_suffix", lambda h, c, p: (torch.cat([h, p((2, c))], 0), c), False),
    PieceOp("cumsum_reverse", lambda h, c, p: (h.flip(0).cumsum(0).flip(0), c), False),
    PieceOp("relu_sum_padded", lambda h, c, p: (h.relu() + h.relu().sum(0), c), False),
    PieceOp("inplace_then_sum", lambda h, c, p: (_inplace_then_sum(h), c), False),
]


def _inplace_then_sum(h: torch.Tensor) -> torch.Tensor:
    y = h.relu()
    v = y.view(-1, y.shape[1])
    y.add_(1)  # v's pad is no longer zero
    return h + v.sum(0)


def build_piece(ops: Sequence[PieceOp], batch: int, width: int,
                seed: int) -> tuple[Callable[..., Any], torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params: list[torch.Tensor] = []

    def record(shape: tuple[int, ...]) -> torch.Tensor:
        params.append(torch.randn(shape, generator=gen, dtype=DTYPE))
        return params[-1]

    def run(x: torch.Tensor, param: Param) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = x, width
        for op in ops:
            h, c = op.fn(h, c, param)
        return h, h.sum(-1)

    x = torch.randn(batch, width, generator=gen, dtype=DTYPE)
    run(x, record)

    def piece(x: torch.Tensor, *ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        it = iter(ps)
        return run(x, lambda shape: next(it))

    return piece, x, params


piece_ops = st.lists(st.sampled_from(SAFE_OPS + UNSAFE_OPS), min_size=1, max_size=4)
PROPERTY = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(ops=piece_ops, batch=st.sampled_from([3, 5, 7]), extra=st.integers(1, 5),
       mode=st.sampled_from(["dynamic_batch", "symbolic", "fake"]), seed=st.integers(0, 2**16))
def test_safe_verdict_means_padding_preserves_outputs(ops: list[PieceOp], batch: int, extra: int,
                                                      mode: str, seed: int) -> None:
    piece, x, params = build_piece(ops, batch, 4, seed)
    gm = trace(piece, x, *params, mode=mode)
    plan = analyze_padding(gm, {0: 0})
    if mode == "dynamic_batch" and all(op.safe for op in ops):
        # Completeness on the safe pool. (Not in the other modes: a concrete trace bakes the
        # batch into reshape sizes, and all-symbolic weights make reshape sizes unprovable.)
        assert plan.safe and plan.required_pad_value is None, [str(r) for r in plan.reasons]
    if plan.safe:
        check_padded_run(gm, plan, [x, *params], batch + extra, seed)


@PROPERTY
@given(ops=piece_ops, batch=st.sampled_from([3, 5, 7]), extra=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_any_pad_verdict_holds_for_random_pad(ops: list[PieceOp], batch: int, extra: int,
                                              seed: int) -> None:
    """With ``allow_zero_pad=False`` every safe verdict holds for arbitrary pad contents."""
    piece, x, params = build_piece(ops, batch, 4, seed)
    gm = trace(piece, x, *params, mode="dynamic_batch")
    plan = analyze_padding(gm, {0: 0}, allow_zero_pad=False)
    assert plan.required_pad_value is None
    if plan.safe:
        check_padded_run(gm, plan, [x, *params], batch + extra, seed)


# ------------------------------------------------------------------------------------------------
# Unsafe, with the right reason
# ------------------------------------------------------------------------------------------------


def only_reason(plan: PaddingPlan) -> Any:
    assert not plan.safe
    assert plan.padded == ()
    assert len(plan.reasons) == 1, [str(r) for r in plan.reasons]
    return plan.reasons[0]


def test_softmax_over_padded_dim_is_unsafe() -> None:
    gm = trace(lambda x: torch.softmax(x, 0) + 1, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert (r.node, r.op) == ("_softmax", "aten._softmax.default")
    assert "softmax over the padded dim 0" in r.why
    assert r.sources == (PadSource(0, 0),)


def test_log_softmax_over_other_dim_is_safe() -> None:
    gm = trace(lambda x: torch.log_softmax(x, 1), rand(5, 4))
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and plan.outputs == (OutputDim(0, 0, PadSource(0, 0)),)


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


def test_sum_over_padded_dim_needs_zero_pad() -> None:
    x = rand(5, 4)
    gm = trace(lambda x: x.sum(0), x)
    r = only_reason(analyze_padding(gm, {0: 0}, allow_zero_pad=False))
    assert r.op == "aten.sum.dim_IntList" and "pad value 0" in r.why
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and plan.required_pad_value == 0.0
    assert plan.verdict(0, 0).required_pad_value == 0.0
    check_padded_run(gm, plan, [x], 8)  # zeros: exact
    random_pad = pad_input(x, 0, 8, False, torch.Generator().manual_seed(1))
    assert not torch.allclose(gm(random_pad), gm(x))  # the requirement is real


@pytest.mark.parametrize("reduce, op", [
    (lambda m: m.mean(0), "aten.mean.dim"),
    (lambda m: m.amax(0), "aten.amax.default"),
    (lambda m: m.sum(0), "aten.sum.dim_IntList"),
])
def test_merging_view_then_reduction_over_merged_dim_is_unsafe(
        reduce: Callable[[torch.Tensor], torch.Tensor], op: str) -> None:
    gm = trace(lambda x: reduce(x.view(-1, x.shape[2]).relu()), rand(5, 3, 4))
    r = only_reason(analyze_padding(gm, {0: 0}, allow_zero_pad=False))
    assert r.op == op and "padded dim 0" in r.why


def test_merging_view_with_row_ops_is_safe_and_slices_by_factor() -> None:
    x, w = rand(5, 3, 4), rand(6, 4, seed=1)
    gm = trace(lambda x, w: F.linear(x.reshape(-1, x.shape[2]), w).relu(), x, w)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    assert plan.outputs == (OutputDim(0, 0, PadSource(0, 0), 1, ((0, 1),)),)
    assert str(plan.outputs[0]) == "output 0 dim 0 = input 0 dim 0 × input 0 dim 1"
    check_padded_run(gm, plan, [x, w], 8)


def test_merging_padded_dim_as_inner_dim_is_unsafe() -> None:
    gm = trace(lambda x: x.t().reshape(-1) * 2, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "aten._unsafe_view.default" and "inner dim" in r.why


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
    # make_fx(fake) bakes x.shape[0] = 5 into div(x, 5): the *graph* is padding-safe (module doc).
    x = rand(5, 4)
    gm = trace(lambda x: x / x.shape[0], x, mode="fake")
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    check_padded_run(gm, plan, [x], 8)


def test_cumsum_over_padded_dim_is_a_causal_scan() -> None:
    # Deliberate: position i of a forward scan reads positions <= i only, and the pad is appended
    # after the real region, so every real output is exact for any pad contents (rule 13).
    x = rand(5, 4)
    gm = trace(lambda x: torch.cumsum(x, 0), x)
    plan = analyze_padding(gm, {0: 0}, allow_zero_pad=False)
    assert plan.safe
    check_padded_run(gm, plan, [x], 8)


def test_reverse_cumsum_over_padded_dim_is_unsafe() -> None:
    gm = trace(lambda x: torch.cumsum(x.flip(0), 0).flip(0), rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "aten.flip.default" and "flip along the padded dim 0" in r.why


def test_topk_along_padded_dim_is_unsafe() -> None:
    gm = trace(lambda x: torch.topk(x, 2, dim=0).values, rand(5, 4))
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.op == "aten.topk.default" and "padded dim 0" in r.why


def test_topk_along_other_dim_is_safe() -> None:
    x = rand(5, 4)
    gm = trace(lambda x: torch.topk(x, 2, dim=1), x)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and {o.output for o in plan.outputs} == {0, 1}
    check_padded_run(gm, plan, [x], 8)


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


def test_embedding_with_padded_indices_needs_zero_pad() -> None:
    idx = torch.tensor([[1, 2, 0], [3, 3, 1], [0, 1, 2], [2, 2, 2], [1, 0, 3]])
    table = rand(4, 6)
    gm = trace(lambda i, w: F.embedding(i, w).relu(), idx, table)
    r = only_reason(analyze_padding(gm, {0: 0}, allow_zero_pad=False))
    assert r.op == "aten.embedding.default" and "pad value 0" in r.why
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and plan.required_pad_value == 0.0
    check_padded_run(gm, plan, [idx, table], 8)


def test_reason_carries_user_source_line() -> None:
    gm = trace(lambda x: torch.softmax(x, 0), rand(5, 4))
    node = next(n for n in gm.graph.nodes if n.name == "_softmax")
    node.meta["stack_trace"] = (
        'File "/src/model.py", line 12, in forward\n    h = torch.softmax(h, 0)\n'
    )
    r = only_reason(analyze_padding(gm, {0: 0}))
    assert r.source_line == "/src/model.py:12 in forward: h = torch.softmax(h, 0)"
    assert "model.py:12" in str(r)


# ------------------------------------------------------------------------------------------------
# Safe, with the right plan
# ------------------------------------------------------------------------------------------------


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


def test_transpose_then_per_row_ops_is_safe() -> None:
    x = rand(5, 4)
    gm = trace(lambda x: torch.softmax(x.t() * 3, dim=0).relu(), x)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe and plan.outputs == (OutputDim(0, 1, PadSource(0, 0)),)
    check_padded_run(gm, plan, [x], 8)


def test_broadcast_bias_add_is_safe_and_size1_broadcast_padded_is_not() -> None:
    x, b = rand(5, 4), rand(4, seed=1)
    gm = trace(lambda x, b: x + b, x, b)
    plan = analyze_padding(gm, {0: 0})
    assert plan.safe
    check_padded_run(gm, plan, [x, b], 8)
    # padding an input against an unpadded input of the same extent cannot even broadcast
    y = rand(5, 4, seed=2)
    gm = trace(lambda x, y: x + y, x, y)
    plan = analyze_padding(gm, {0: 0})
    assert not plan.safe and "meets unpadded dim 0" in plan.reasons[0].why
    plan = analyze_padding(gm, {0: 0, 1: 0})  # both padded: fine, and tied to one bucket
    assert plan.safe and plan.ties == ((PadSource(0, 0), PadSource(1, 0)),)


def test_cat_after_a_fixed_prefix_is_safe_and_shifted() -> None:
    cache, x = rand(3, 4), rand(5, 4, seed=1)
    gm = trace(lambda c, x: torch.cat([c, x], 0).relu(), cache, x)
    plan = analyze_padding(gm, {1: 0}, allow_zero_pad=False)
    assert plan.safe and plan.outputs == (OutputDim(0, 0, PadSource(1, 0), shifted=True),)
    check_padded_run(gm, plan, [cache, x], 8)


def test_causal_attention_padded_on_sequence_is_safe() -> None:
    q, k, v = rand(2, 2, 5, 4), rand(2, 2, 5, 4, seed=1), rand(2, 2, 5, 4, seed=2)

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    gm = trace(lambda q, k, v: attn(q, k, v, True), q, k, v)
    plan = analyze_padding(gm, {0: 2, 1: 2, 2: 2}, allow_zero_pad=False)
    assert plan.safe, [str(r) for r in plan.reasons]
    check_padded_run(gm, plan, [q, k, v], 8)
    gm = trace(lambda q, k, v: attn(q, k, v, False), q, k, v)
    assert not analyze_padding(gm, {0: 2, 1: 2, 2: 2}).safe


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


# ------------------------------------------------------------------------------------------------
# The pass contract
# ------------------------------------------------------------------------------------------------


def test_pass_default_proposal_and_result() -> None:
    x, w = rand(5, 4), rand(6, 4, seed=1)
    gm = trace(lambda x, w: F.linear(x, w).relu(), x, w)
    before = gm.code
    result = PaddingAnalysisPass()(gm, Config())
    assert isinstance(result, PassResult) and result.modified is False
    assert result.graph_module is gm and gm.code == before
    (plan,) = result.findings
    # make_fx(symbolic) makes every dim symbolic: both inputs are proposed; padding the weight's
    # dim 0 would pad the output features, which meets nothing unpadded here, so both are safe.
    assert {v.source for v in plan.inputs} == {PadSource(0, 0), PadSource(1, 0)}
    assert plan.verdict(0, 0).safe
    assert PaddingAnalysisPass.name == "padding_analysis"
    assert PaddingAnalysisPass.stage == "post_aot"


def test_pass_explicit_proposal() -> None:
    gm = trace(lambda x: torch.softmax(x, 0), rand(5, 4))
    p = PaddingAnalysisPass(pad_dims={0: [0, 1]})
    assert p.pad_dims == ((0, (0, 1)),)
    (plan,) = p.run(gm, Config()).findings
    assert not plan.verdict(0, 0).safe and plan.verdict(0, 1).safe


def test_aot_training_graphs_need_zero_pad_for_weight_gradients() -> None:
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.aot_autograd import make_boxed_func

    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(F.linear(x, w).relu(), (6,))

    compiled = aot_function(f, fw_compiler=capture, bw_compiler=capture, dynamic=True)
    compiled(rand(5, 4), rand(6, 4, seed=1).requires_grad_()).sum().backward()
    fw, bw = graphs
    (fw_plan,) = PaddingAnalysisPass().run(fw, Config()).findings
    assert [v.source for v in fw_plan.inputs] == [PadSource(0, 0)]  # the weight's dim 0 is static
    assert fw_plan.safe and fw_plan.required_pad_value is None
    assert {o.output for o in fw_plan.outputs} == set(range(6))  # output and saved activations
    # The backward sums the weight gradient over the batch: exact with zero-padded inputs only.
    (bw_plan,) = PaddingAnalysisPass().run(bw, Config()).findings
    assert len(bw_plan.inputs) == 6 and bw_plan.safe and bw_plan.required_pad_value == 0.0
    (strict,) = PaddingAnalysisPass(allow_zero_pad=False).run(bw, Config()).findings
    assert not strict.safe and "aten.mm.default" in reason_ops(strict)
