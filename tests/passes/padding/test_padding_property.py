"""Property tests of the padding analysis: random pieces built with ``make_fx``; whenever the
analysis says *safe*, the piece runs on inputs padded with random contents (zeros only where the
plan requires pad value 0), its outputs are sliced back per the plan and compared with the
unpadded run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from padding_helpers import DTYPE, check_padded_run, trace

from hpuopt.passes.padding import analyze_padding

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
