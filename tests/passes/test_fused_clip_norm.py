"""FusedClipNormPass on the graphs Dynamo really captures for clip_grad_norm_."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.backends.common import aot_autograd

from hpuopt.config import Config
from hpuopt.passes.fused_clip_norm import FusedClipNormPass, FusedNorm, FusedScale, ClipNormSkipped

STEPS = 20


def _calls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


class Recorder:
    def __init__(self, aot: bool = False) -> None:
        self.results, self.before, self.after, self.aot = [], [], [], aot

    def __call__(self, gm, example_inputs):
        self.before.append(_calls(gm))
        result = FusedClipNormPass()(gm, Config())
        self.results.append(result)
        self.after.append(_calls(result.graph_module))
        if self.aot:
            return aot_autograd(fw_compiler=lambda g, _: g)(result.graph_module, example_inputs)
        return result.graph_module.forward

    def findings(self, kind):
        return [f for r in self.results for f in r.findings if isinstance(f, kind)]


def _run(shapes, max_norm, foreach, seed, norm_type=2.0, aot=False, steps=STEPS):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    recorder = Recorder(aot=aot)

    def clip(ps):
        return torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type=norm_type, foreach=foreach)

    compiled = torch.compile(clip, backend=recorder)
    for i in range(steps):
        scale = 10.0 ** (i % 3 - 1)  # norms below, around and above max_norm
        for p, q in zip(params, twins):
            g = torch.randn(p.shape, generator=gen) * scale
            p.grad, q.grad = g.clone(), g.clone()
        total = compiled(params)
        expected = clip(twins)
        torch.testing.assert_close(total, expected)
        for p, q in zip(params, twins):
            torch.testing.assert_close(p.grad, q.grad)
    return recorder


shape = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(shape, min_size=2, max_size=8),
    max_norm=st.floats(0.1, 10.0),
    foreach=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_l2_clip_equals_eager_and_is_fused(shapes, max_norm, foreach, seed):
    recorder = _run(shapes, max_norm, foreach, seed)
    (norm,) = recorder.findings(FusedNorm)
    assert norm.num_grads == len(shapes)
    assert not recorder.findings(ClipNormSkipped)
    if not foreach:
        (scale,) = recorder.findings(FusedScale)
        assert scale.num_grads == len(shapes)
    # _foreach_norm, stack, vector_norm, add, div, clamp, to, _foreach_mul_, 2x set_grad_enabled
    assert recorder.after == [10]


@pytest.mark.parametrize("foreach", [False, True])
def test_node_count_is_independent_of_the_number_of_grads(foreach):
    small = _run([(3,)] * 3, 1.0, foreach, seed=0, steps=1)
    large = _run([(3,)] * 12, 1.0, foreach, seed=0, steps=1)
    assert large.before[0] >= small.before[0] + 9 * (1 if foreach else 3)
    assert small.after == large.after


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm_type", [float("inf"), 1.0, 3.0])
def test_other_norm_types_are_left_alone_with_reason(foreach, norm_type):
    recorder = _run([(2, 3), (4,), (5,)], 1.0, foreach, seed=1, norm_type=norm_type, steps=3)
    assert not recorder.findings(FusedNorm) and not recorder.findings(FusedScale)
    assert not any(r.modified for r in recorder.results)
    reasons = {s.reason for s in recorder.findings(ClipNormSkipped)}
    assert reasons == {f"norm_type {norm_type!r} is not the L2 norm"}
    assert recorder.before == recorder.after


@pytest.mark.parametrize("foreach", [False, True])
def test_survives_aot_autograd(foreach):
    recorder = _run([(2, 3), (4,), (5,), (1,)], 0.5, foreach, seed=2, aot=True)
    assert recorder.findings(FusedNorm)


def test_error_if_nonfinite_keeps_raising():
    """Dynamo graph-breaks on the non-finite check; whatever is compiled, the error stays."""
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(3)
    params[1].grad[0] = float("nan")
    recorder = Recorder()
    compiled = torch.compile(
        lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True), backend=recorder
    )
    with pytest.raises(RuntimeError, match="non-finite"):
        compiled()


def test_disabled_by_name():
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(3)
    results = []

    def capture(gm, example_inputs):
        results.append(FusedClipNormPass()(gm, Config(disable_passes=("fused_clip_norm",))))
        return gm.forward

    torch.compile(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), backend=capture)()
    assert results and not results[0].modified and results[0].findings == ()
