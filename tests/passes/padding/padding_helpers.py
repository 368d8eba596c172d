"""Helpers of the padding analysis tests (``hpuopt.passes.padding``): tracing with a dynamic
batch, padding inputs, running a graph padded per a plan and comparing with the unpadded run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from hpuopt.records import PaddingPlan
from hpuopt.runtime.padder import slice_outputs

DTYPE = torch.float64  # exact enough that kernels picked for another shape compare tightly


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
    elif x.dtype == torch.bool:
        fill = torch.randint(0, 2, extra, generator=gen).bool()
    elif x.is_floating_point():
        # any contents, as the runtime's are: large values, and NaN and infinities (the
        # runtime fills a float pad it need not zero with NaN)
        fill = torch.randn(extra, generator=gen, dtype=x.dtype) * 3
        pick = torch.rand(extra, generator=gen)
        fill[pick < 0.3] = float("nan")
        fill[(pick >= 0.3) & (pick < 0.4)] = float("inf")
        fill[(pick >= 0.4) & (pick < 0.5)] = float("-inf")
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


def only_reason(plan: PaddingPlan) -> Any:
    assert not plan.safe
    assert plan.padded == ()
    assert len(plan.reasons) == 1, [str(r) for r in plan.reasons]
    return plan.reasons[0]
