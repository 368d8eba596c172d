"""FusedAdamPass on the graphs Dynamo really captures for torch.optim.Adam / AdamW steps."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.backends.common import aot_autograd

import hpuopt.optim
from hpuopt.config import Config
from hpuopt.passes.fused_adam import FusedAdamPass, FusedAdamRewrite, FusedAdamSkipped
from hpuopt.passes.fused_clip_norm import FusedClipNormPass

STEPS = 20


class PassBackend:
    """A Dynamo backend that applies passes to each captured graph and runs the result."""

    def __init__(self, *passes, aot: bool = False) -> None:
        self.passes = passes
        self.results = []
        self.graphs = []
        self.aot = aot

    def _apply(self, gm, example_inputs):
        for p in self.passes:
            result = p(gm, Config())
            self.results.append(result)
            gm = result.graph_module
        self.graphs.append(gm)
        return gm

    def __call__(self, gm, example_inputs):
        gm = self._apply(gm, example_inputs)
        if self.aot:
            return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)
        return gm.forward

    def findings(self, kind):
        return [f for r in self.results for f in r.findings if isinstance(f, kind)]


def _optimizer_calls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def _make(shapes_per_group, group_options, kind, foreach, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = [[torch.randn(s, generator=gen) for s in shapes] for shapes in shapes_per_group]

    def build():
        params = [[torch.nn.Parameter(t.clone()) for t in g] for g in groups]
        cls = getattr(torch.optim, kind)
        opt = cls(
            [dict(params=ps, **o) for ps, o in zip(params, group_options)], foreach=foreach
        )
        return [p for ps in params for p in ps], opt

    return build() + build()


def _set_grads(params, twins, gen):
    for p, q in zip(params, twins):
        g = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()


def _assert_same_state(opt, ref, params, twins):
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)
        assert opt.state[p].keys() == ref.state[q].keys()
        for key in ref.state[q]:
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key])


def _run_against_eager(kind, foreach, shapes_per_group, group_options, seed, steps=STEPS, aot=False,
                       via="opt.step"):
    torch._dynamo.reset()  # each example is a fresh compile; the recompile limit is per test
    params, opt, twins, ref = _make(shapes_per_group, group_options, kind, foreach, seed)
    backend = PassBackend(FusedAdamPass(), aot=aot)
    if via == "opt.step":
        step = torch.compile(lambda: opt.step(), backend=backend)
    else:  # one graph; a CPU group with foreach=None is traced in its foreach form
        step = torch.compile(lambda: hpuopt.optim.step(opt), backend=backend)
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(steps):
        if i == steps // 2:  # a save/load round trip both ways, through plain torch.optim
            saved, saved_ref = copy.deepcopy(opt.state_dict()), copy.deepcopy(ref.state_dict())
            _assert_same_state(opt, ref, params, twins)
            opt.load_state_dict(saved_ref)
            ref.load_state_dict(saved)
        _set_grads(params, twins, gen)
        step()
        ref.step()
    _assert_same_state(opt, ref, params, twins)
    # the groups (hyperparameters, foreach, capturable) are what eager's are
    assert opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    return backend


hyper = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.1),
        "betas": st.tuples(st.floats(0.5, 0.95), st.floats(0.9, 0.9999)),
        "eps": st.floats(1e-10, 1e-6),
        "weight_decay": st.one_of(st.just(0.0), st.floats(1e-3, 0.2)),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
    }
)
shape = st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["Adam", "AdamW"]),
    foreach=st.sampled_from([False, True, None]),
    groups=st.lists(st.tuples(st.lists(shape, min_size=1, max_size=3), hyper), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    via=st.sampled_from(["opt.step", "hpuopt.optim.step"]),
)
def test_rewritten_step_equals_eager_torch_optim(kind, foreach, groups, seed, via):
    shapes = [g[0] for g in groups]
    options = [g[1] for g in groups]
    backend = _run_against_eager(kind, foreach, shapes, options, seed, via=via)
    rewrites = backend.findings(FusedAdamRewrite)
    assert rewrites, backend.findings(FusedAdamSkipped)
    assert not backend.findings(FusedAdamSkipped)
    # every param group of every compile (before and after load_state_dict) became fused calls
    assert sum(r.num_params for r in rewrites) == len(backend.graphs) * sum(map(len, shapes))
    # _foreach_add_(steps) + fused per group; hpuopt.optim.step also sets and restores grad mode
    # inside the graph (opt.step() does it in the frames around it)
    grad_mode = 0 if via == "opt.step" else 2
    for gm in backend.graphs:
        assert _optimizer_calls(gm) <= 2 * len(groups) + grad_mode
    read = {
        (h.lr, (h.beta1, h.beta2), h.eps, h.amsgrad, h.maximize, h.decoupled_weight_decay)
        for h in (r.hyperparams for r in rewrites)
    }
    given_ = {
        (o["lr"], o["betas"], o["eps"], o["amsgrad"], o["maximize"], kind == "AdamW" and o["weight_decay"] != 0)
        for o in options
    }
    assert read == given_  # the hyperparameters were read back exactly


@pytest.mark.parametrize("foreach", [False, True])
def test_node_count_drops_from_per_parameter_to_constant(foreach):
    counts = {}
    for n in (4, 16):
        torch._dynamo.reset()
        params = [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.01, foreach=foreach)
        for p in params:
            p.grad = torch.randn(3)
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(_optimizer_calls(gm))
            result = FusedAdamPass()(gm, Config())
            graphs.append(_optimizer_calls(result.graph_module))
            return result.graph_module.forward

        torch.compile(lambda: opt.step(), backend=capture)()
        counts[n] = graphs
    (before_4, after_4), (before_16, after_16) = counts[4], counts[16]
    assert before_16 >= before_4 + 12  # O(parameters) before
    assert after_4 == after_16 == 2  # _foreach_add_ + _fused_adamw_


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("capturable", [False, True])
def test_tensor_lr(foreach, capturable):
    if foreach and not capturable:
        pytest.skip("torch.optim rejects a Tensor lr with foreach=True, capturable=False")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    twins = [torch.nn.Parameter(t.clone()) for t in init]
    opt = torch.optim.Adam(params, lr=torch.tensor(0.01), foreach=foreach, capturable=capturable)
    # eager capturable=True needs a CUDA device; the single-tensor path is the same algorithm
    ref = torch.optim.Adam(twins, lr=torch.tensor(0.01), foreach=False)
    backend = PassBackend(FusedAdamPass())
    step = torch.compile(lambda: opt.step(), backend=backend)
    for _ in range(STEPS):
        _set_grads(params, twins, gen)
        step()
        ref.step()
    _assert_same_state(opt, ref, params, twins)
    (rewrite,) = backend.findings(FusedAdamRewrite)
    assert rewrite.hyperparams.lr is None  # the graph's own lr input feeds the kernel


@pytest.mark.parametrize("foreach", [False, True])
def test_clip_and_step_under_aot_autograd(foreach):
    """With ``functional=True`` the rewrite survives AOTAutograd functionalization and equals eager.

    (The in-place ``torch._fused_adam(w)_`` does not: see :attr:`FusedAdamPass.functional`.)
    """
    torch._dynamo.reset()
    params, opt, twins, ref = _make([[(3, 2), (4,), (2, 2)]], [dict(lr=0.01, weight_decay=0.1)],
                                    "AdamW", foreach, seed=7)  # fmt: skip
    backend = PassBackend(FusedClipNormPass(), FusedAdamPass(functional=True), aot=True)

    def step():
        torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=foreach)
        opt.step()

    compiled = torch.compile(step, backend=backend)
    gen = torch.Generator().manual_seed(8)
    for _ in range(STEPS):
        _set_grads(params, twins, gen)
        compiled()
        torch.nn.utils.clip_grad_norm_(twins, 0.5, foreach=foreach)
        ref.step()
    _assert_same_state(opt, ref, params, twins)
    assert len(backend.findings(FusedAdamRewrite)) == 1


def test_in_place_kernel_does_not_survive_functionalization():
    """Documents why ``functional=True`` exists; if torch fixes this, the option can go."""
    torch._dynamo.reset()
    params, opt, _, _ = _make([[(3,)]], [dict(lr=0.01)], "Adam", False, seed=1)
    params[0].grad = torch.randn(3)
    compiled = torch.compile(lambda: opt.step(), backend=PassBackend(FusedAdamPass(), aot=True))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="non-functional"):
        compiled()


def test_hand_written_copy_of_torch_adam_is_recognised():
    """The match is structural: a replica of torch's traced update is fused too."""
    torch._dynamo.reset()
    n = 3
    params = [torch.randn(4) for _ in range(n)]
    grads = [torch.randn(4) for _ in range(n)]
    ms, vs = [torch.zeros(4) for _ in range(n)], [torch.zeros(4) for _ in range(n)]
    steps = [torch.tensor(0.0) for _ in range(n)]
    backend = PassBackend(FusedAdamPass())
    torch.compile(_replica_adam(modified=False), backend=backend)(params, grads, ms, vs, steps)
    assert len(backend.findings(FusedAdamRewrite)) == 1


def test_modified_update_rule_is_left_alone_with_reason():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    n = 3
    params = [torch.randn(4, generator=gen) for _ in range(n)]
    grads = [torch.randn(4, generator=gen) for _ in range(n)]
    ms, vs = [torch.zeros(4) for _ in range(n)], [torch.zeros(4) for _ in range(n)]
    steps = [torch.tensor(0.0) for _ in range(n)]
    expected = [p.clone() for p in params]
    _replica_adam(modified=True)(expected, grads, [m.clone() for m in ms], [v.clone() for v in vs],
                                 [s.clone() for s in steps])  # fmt: skip
    backend = PassBackend(FusedAdamPass())
    torch.compile(_replica_adam(modified=True), backend=backend)(params, grads, ms, vs, steps)
    assert not backend.findings(FusedAdamRewrite)
    skipped = backend.findings(FusedAdamSkipped)
    assert len(skipped) == n
    assert all("Adam" in s.reason and "at " in s.reason for s in skipped), skipped
    assert not any(r.modified for r in backend.results)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e)


def test_disabled_by_name():
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    opt = torch.optim.Adam(params)
    for p in params:
        p.grad = torch.randn(3)
    results = []

    def capture(gm, example_inputs):
        results.append(FusedAdamPass()(gm, Config(disable_passes=("fused_adam",))))
        return gm.forward

    torch.compile(lambda: opt.step(), backend=capture)()
    assert results and not results[0].modified and results[0].findings == ()


def _replica_adam(modified: bool):
    """torch's capturable single-tensor Adam update, written by hand (optionally altered)."""

    def update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8):
        for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            step_t += 1
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step_t
            bias_correction2 = 1 - beta2**step_t
            step_size_neg = (lr / bias_correction1).neg()
            bias_correction2_sqrt = bias_correction2.sqrt()
            if modified:  # no second-moment bias correction: a different optimizer
                bias_correction2_sqrt = bias_correction2_sqrt * 0 + 1
            denom = (exp_avg_sq.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
            param.addcdiv_(exp_avg, denom)

    return update
