"""``hpuopt.optim.step``: what ``optimizer.step()`` does, in one Dynamo graph."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import hpuopt
from hpuopt.optim import undecorated_step
from hpuopt.testing import RecordingBackend

OPTIMIZERS = {
    "adam": lambda ps, kw: torch.optim.Adam(ps, **kw),
    "adamw": lambda ps, kw: torch.optim.AdamW(ps, **kw),
    "sgd": lambda ps, kw: torch.optim.SGD(ps, momentum=0.9, **kw),
}


def _pair(kind: str, sizes: list[int], **kw):
    a = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, OPTIMIZERS[kind](a, kw), b, OPTIMIZERS[kind](b, kw)


def _set_grads(*param_lists):
    grads = [torch.randn_like(p) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    lr=st.floats(1e-4, 0.1),
    weight_decay=st.sampled_from([0.0, 0.01]),
    foreach=st.sampled_from([None, False, True]),
)
def test_eager_step_is_optimizer_step_bitwise(kind, sizes, lr, weight_decay, foreach):
    a, opt_a, b, opt_b = _pair(kind, sizes, lr=lr, weight_decay=weight_decay, foreach=foreach)
    for _ in range(3):
        _set_grads(a, b)
        hpuopt.optim.step(opt_a)
        opt_b.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    assert str(opt_a.state_dict()) == str(opt_b.state_dict())


def test_hooks_run_in_order_and_a_pre_hook_may_replace_arguments():
    a, opt, b, ref = _pair("adam", [7, 3], lr=0.1)
    calls: list[str] = []

    def pre(o, args, kwargs):
        calls.append("pre")
        assert o in (opt, ref) and args == (o,) and kwargs == {}
        return args, kwargs

    def post(o, args, kwargs):
        calls.append("post")

    def global_pre(o, args, kwargs):
        calls.append("global_pre")

    def global_post(o, args, kwargs):
        calls.append("global_post")

    handles = [
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(post),
        ref.register_step_pre_hook(pre),
        ref.register_step_post_hook(post),
        register_optimizer_step_pre_hook(global_pre),
        register_optimizer_step_post_hook(global_post),
    ]
    try:
        _set_grads(a, b)
        hpuopt.optim.step(opt)
        got, calls[:] = list(calls), []
        ref.step()  # the reference order, from torch itself
        assert got == calls == ["global_pre", "pre", "post", "global_post"]
    finally:
        for h in handles:
            h.remove()


def test_bad_pre_hook_result_is_named():
    a, opt, _, _ = _pair("sgd", [4])
    opt.register_step_pre_hook(lambda o, args, kwargs: 42)
    _set_grads(a)
    with pytest.raises(RuntimeError, match="must return None or"):
        hpuopt.optim.step(opt)


def test_closure_is_called_and_its_loss_returned():
    a, opt, b, ref = _pair("adam", [5], lr=0.05)
    x = torch.randn(5)

    def closure_for(params, o):
        def closure():
            o.zero_grad()
            loss = (params[0] * x).sum() ** 2
            loss.backward()
            return loss

        return closure

    got = hpuopt.optim.step(opt, closure_for(a, opt))
    want = ref.step(closure_for(b, ref))
    torch.testing.assert_close(got, want)
    assert torch.equal(a[0], b[0])


def test_grad_mode_is_restored_even_when_the_update_raises():
    a, opt, _, _ = _pair("adam", [3])
    _set_grads(a)
    opt.param_groups[0]["lr"] = "not a number"
    with torch.enable_grad():
        with pytest.raises(Exception):
            hpuopt.optim.step(opt)
        assert torch.is_grad_enabled()


def test_not_an_optimizer_is_refused():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        hpuopt.optim.step(object())  # type: ignore[arg-type]


def test_optimizer_without_torch_decorator_is_stepped_plainly():
    class Plain(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.5})

        def step(self, closure=None):  # no graph-breaking decorator
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad, alpha=-group["lr"])

    assert undecorated_step(Plain) is None
    assert undecorated_step(torch.optim.Adam) is not None
    p = torch.nn.Parameter(torch.randn(4))
    before = p.detach().clone()
    p.grad = torch.randn(4)
    hpuopt.optim.step(Plain([p]))
    torch.testing.assert_close(p.detach(), before - 0.5 * p.grad)


def _train_step(params, opt, use_hpuopt):
    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if use_hpuopt:
            hpuopt.optim.step(opt)
        else:
            opt.step()

    return step


def test_clip_and_step_compile_to_one_graph_instead_of_several():
    counts = {}
    for use_hpuopt in (False, True):
        torch._dynamo.reset()
        params = [torch.nn.Parameter(torch.randn(n)) for n in (6, 9)]
        opt = torch.optim.Adam(params, lr=0.01)
        _set_grads(params)
        backend = RecordingBackend()
        torch.compile(_train_step(params, opt, use_hpuopt), backend=backend)()
        counts[use_hpuopt] = len(backend.graphs(stage="pre_aot"))
    assert counts[True] == 1 and counts[False] > 1


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_compiled_step_matches_eager_and_fuses(kind):
    a, opt_a, b, opt_b = _pair(kind, [8, 33, 5], lr=0.01, weight_decay=0.01)
    compiled = torch.compile(_train_step(a, opt_a, True), backend="hpugraph")
    eager = _train_step(b, opt_b, False)
    for _ in range(6):
        _set_grads(a, b)
        compiled()
        eager()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q)
    assert hpuopt.counters.dynamo_graphs == 1
    (graph,) = hpuopt.explain().graphs
    assert {"fused_clip_norm", "fused_adam"} <= set(graph.rewrites)
    # the state stays loadable by plain torch.optim, which carries on from it like eager
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fresh = OPTIMIZERS[kind](fresh_params, {"lr": 0.01, "weight_decay": 0.01})
    fresh.load_state_dict(opt_a.state_dict())
    _set_grads(fresh_params, b)
    fresh.step()
    opt_b.step()
    for p, q in zip(fresh_params, b):
        torch.testing.assert_close(p, q)


def _groups_without_params(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]


@pytest.mark.parametrize("kind", ["adam", "adamw"])
@pytest.mark.parametrize("foreach", [None, False])
def test_cpu_group_left_to_torch_is_traced_in_its_foreach_form(kind, foreach):
    sizes = [8, 33, 5, 12]
    a, opt_a, b, opt_b = _pair(kind, sizes, lr=0.02, foreach=foreach)
    opt_a.add_param_group({"params": [torch.nn.Parameter(torch.randn(7))], "lr": 0.003})
    opt_b.add_param_group({"params": [torch.nn.Parameter(opt_a.param_groups[1]["params"][0]
                                                          .detach().clone())], "lr": 0.003})
    a, b = a + opt_a.param_groups[1]["params"], b + opt_b.param_groups[1]["params"]
    groups_before = _groups_without_params(opt_a)
    backend = RecordingBackend()
    compiled = torch.compile(_train_step(a, opt_a, True), backend=backend)
    for _ in range(4):
        _set_grads(a, b)
        compiled()
        _train_step(b, opt_b, False)()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q)
    # one graph over all steps: the groups (guarded by Dynamo) came back exactly as they were
    (snapshot,) = backend.graphs(stage="pre_aot")
    assert _groups_without_params(opt_a) == groups_before
    assert _groups_without_params(opt_a) == _groups_without_params(opt_b)
    # what Dynamo traced: per-parameter update ops only when the user asked for that form
    per_param_lerps = sum(
        n.op == "call_method" and n.target == "lerp_" for n in snapshot.before.graph.nodes
    )
    assert per_param_lerps == (len(a) if foreach is False else 0)
    assert "fused_adam" in backend.explain().graphs[0].rewrites


def test_foreach_form_is_only_traced_under_compile():
    a, opt, _, _ = _pair("adam", [4, 6])
    _set_grads(a)
    assert hpuopt.optim._groups_traced_as_foreach(opt) == []  # eager: torch's own choice
    opt.param_groups[0]["foreach"] = True
    assert hpuopt.optim._groups_traced_as_foreach(opt) == []


def test_lr_scheduler_sees_the_eager_step():
    a, opt, b, ref = _pair("adam", [4, 2], lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref, gamma=0.5)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        for _ in range(3):
            _set_grads(a, b)
            hpuopt.optim.step(opt)
            sched.step()
            ref.step()
            ref_sched.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.1 * 0.5**3


def test_tensor_lr_with_a_scheduler_is_one_graph_and_matches_eager():
    sizes = [5, 7, 3]
    a = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = torch.optim.AdamW(a, lr=torch.tensor(0.05), weight_decay=0.01)
    opt_b = torch.optim.AdamW(b, lr=torch.tensor(0.05), weight_decay=0.01)
    sched_a = torch.optim.lr_scheduler.ExponentialLR(opt_a, gamma=0.8)
    sched_b = torch.optim.lr_scheduler.ExponentialLR(opt_b, gamma=0.8)
    compiled = torch.compile(_train_step(a, opt_a, True), backend="hpugraph")
    for _ in range(8):
        _set_grads(a, b)
        compiled()
        sched_a.step()
        _train_step(b, opt_b, False)()
        sched_b.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q)
    assert hpuopt.counters.dynamo_graphs == 1  # the changing lr is a graph input, no recompile
    torch.testing.assert_close(opt_a.param_groups[0]["lr"], opt_b.param_groups[0]["lr"])
