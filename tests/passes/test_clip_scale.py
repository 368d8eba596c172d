"""The clip_scale pass alone: the clip's multiply folds into the fused Adam kernels that read
the gradients next, results stay those of the two kernels run one after the other, and every
near-miss is left alone with its reason."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hpuopt
from hpuopt import Config
from hpuopt.passes.clip_scale import ClipScaleFolded, ClipScaleKept, ClipScalePass
from hpuopt.testing import RecordingBackend, aten_graph, count_ops

aten = torch.ops.aten
KW = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False,
          maximize=False)


def _coef(grads, max_norm):
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def _state(sizes, dtype=torch.float32):
    p = [torch.randn(n, dtype=dtype) for n in sizes]
    g = [torch.randn(n, dtype=dtype) for n in sizes]
    m = [torch.randn(n, dtype=dtype) for n in sizes]
    v = [torch.rand(n, dtype=dtype) for n in sizes]
    s = [torch.tensor(float(k + 1)) for k in range(len(sizes))]
    return p, g, m, v, s


def _clone(state):
    return [[t.clone() for t in lst] for lst in state]


def _clip_then_adam(max_norm, adamw=False):
    kernel = torch._fused_adamw_ if adamw else torch._fused_adam_

    def step(p, g, m, v, s):
        torch._foreach_mul_(g, _coef(g, max_norm))
        torch._foreach_add_(s, 1)
        kernel(p, g, m, v, [], s, **KW)

    return step


def _run_pass(fn, state):
    gm = aten_graph(fn, *_clone(state))
    return gm, ClipScalePass()(gm, Config())


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    max_norm=st.sampled_from([0.05, 0.5, 3.0, 1e6]),
    adamw=st.booleans(),
)
def test_fold_fires_and_keeps_results(sizes, max_norm, adamw):
    state = _state(sizes)
    step = _clip_then_adam(max_norm, adamw)
    gm, result = _run_pass(step, state)
    (found,) = result.findings
    assert isinstance(found, ClipScaleFolded) and found.tensors == len(sizes)
    assert count_ops(gm, aten._foreach_mul_) == 0
    (kernel,) = [n for n in gm.graph.nodes if "fused_adam" in str(n.target)]
    assert kernel.kwargs["grad_scale"] is not None
    mine, ref = _clone(state), _clone(state)
    gm(*mine)
    step(*ref)
    for k, (got_list, want_list) in enumerate(zip(mine, ref)):  # p, clipped g, m, v, steps
        for got, want in zip(got_list, want_list):
            if max_norm == 1e6:  # the clip does nothing: the scale is exactly 1
                assert torch.equal(got, want)
            elif k == 1:  # g / (1 / c) against g * c: the last bit at most
                torch.testing.assert_close(got, want, rtol=2.5e-7, atol=0.0)
            else:  # what the update computes from them: float32's usual tolerance
                torch.testing.assert_close(got, want)


def test_two_kernels_sharing_the_clipped_gradients_both_scale():
    state = _state([3, 5, 7, 2])

    def step(p, g, m, v, s):  # two param groups: one clip, two fused kernels
        torch._foreach_mul_(g, _coef(g, 0.3))
        torch._fused_adam_(p[:2], g[:2], m[:2], v[:2], [], s[:2], **KW)
        torch._fused_adam_(p[2:], g[2:], m[2:], v[2:], [], s[2:], **{**KW, "lr": 0.1})

    gm, result = _run_pass(step, state)
    (found,) = result.findings
    assert isinstance(found, ClipScaleFolded) and len(found.kernels) == 2
    mine, ref = _clone(state), _clone(state)
    gm(*mine)
    step(*ref)
    for got_list, want_list in zip(mine, ref):
        for got, want in zip(got_list, want_list):
            torch.testing.assert_close(got, want)


def _kept(step, state):
    gm, result = _run_pass(step, state)
    assert not result.modified
    assert count_ops(gm, aten._foreach_mul_) == 1
    (found,) = result.findings
    assert isinstance(found, ClipScaleKept)
    return found.reason


def test_a_reader_between_clip_and_step_keeps_the_multiply():
    def step(p, g, m, v, s):
        torch._foreach_mul_(g, _coef(g, 0.3))
        torch._foreach_add_(m, g)  # reads the clipped gradients before the kernel
        torch._fused_adam_(p, g, m, v, [], s, **KW)

    assert "reads" in _kept(step, _state([4, 6]))


def test_a_step_over_some_of_the_clipped_gradients_keeps_the_multiply():
    def step(p, g, m, v, s):
        torch._foreach_mul_(g, _coef(g, 0.3))
        torch._fused_adam_(p[:1], g[:1], m[:1], v[:1], [], s[:1], **KW)

    assert "read by no fused kernel" in _kept(step, _state([4, 6]))


def test_a_step_over_unclipped_gradients_too_keeps_the_multiply():
    def step(p, g, m, v, s):
        torch._foreach_mul_(g[:1], _coef(g[:1], 0.3))
        torch._fused_adam_(p, g, m, v, [], s, **KW)

    assert "did not scale" in _kept(step, _state([4, 6]))


def test_a_kernel_with_its_own_grad_scale_keeps_the_multiply():
    def step(p, g, m, v, s):
        torch._foreach_mul_(g, _coef(g, 0.3))
        torch._fused_adam_(p, g, m, v, [], s, **KW, grad_scale=torch.tensor(2.0))

    assert "grad_scale" in _kept(step, _state([4, 6]))


def test_a_float64_scale_keeps_the_multiply():
    state = _state([4, 6], dtype=torch.float64)
    assert "float32" in _kept(_clip_then_adam(0.3), state)


def test_a_multiply_that_no_step_reads_is_not_a_candidate():
    def step(p, g, m, v, s):
        torch._foreach_mul_(g, _coef(g, 0.3))
        torch._foreach_add_(p, g)

    gm, result = _run_pass(step, _state([4]))
    assert not result.modified and result.findings == ()


def test_compiled_clip_and_step_folds_and_matches_eager_over_20_steps():
    sizes = [8, 33, 5, 17]
    a = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = torch.optim.Adam(a, lr=0.01), torch.optim.Adam(b, lr=0.01)
    backend = RecordingBackend()

    @torch.compile(backend=backend)
    def compiled():
        torch.nn.utils.clip_grad_norm_(a, 0.5)
        hpuopt.optim.step(opt_a)

    for _ in range(20):
        grads = [torch.randn(n) * 2 for n in sizes]  # norm ~ 16: the clip is active
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        compiled()
        torch.nn.utils.clip_grad_norm_(b, 0.5)
        opt_b.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p.grad, q.grad)  # .grad holds the clipped gradient
            torch.testing.assert_close(p, q)
    (inference,) = backend.graphs(stage="post_aot")
    assert isinstance(inference.result.results["clip_scale"].findings[0], ClipScaleFolded)
    assert count_ops(inference.after, aten._foreach_mul_) == 0
    assert "rewritten by: reinplace, clip_scale" in str(backend.explain())


def test_explain_names_the_fold_and_what_kept_the_multiply():
    sizes = [6, 9]
    a = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = torch.optim.AdamW(a, lr=0.01), torch.optim.AdamW(b, lr=0.01)

    def step(params, opt, use_hpuopt):
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        seen = params[0].grad.sum()  # reads a clipped gradient before the update
        hpuopt.optim.step(opt) if use_hpuopt else opt.step()
        return seen

    backend = RecordingBackend()
    compiled = torch.compile(lambda: step(a, opt_a, True), backend=backend)
    for _ in range(3):
        grads = [torch.randn(n) * 3 for n in sizes]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch.testing.assert_close(compiled(), step(b, opt_b, False))
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q)
    text = str(backend.explain())
    assert "rewritten by: reinplace" in text and "clip_scale" not in text.split("left alone")[0]
    assert "left alone by clip_scale: " in text and "after it is scaled" in text
