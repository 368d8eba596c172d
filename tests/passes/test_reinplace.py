"""The reinplace pass alone: fires on functionalised multi-tensor updates, keeps results, and
refuses when the old value of a written input is still read."""

from __future__ import annotations

import torch

from hpuopt import Config
from hpuopt.passes.reinplace import Reinplaced, ReinplacePass, ReinplaceSkipped
from hpuopt.testing import assert_ops, aten_graph

aten = torch.ops.aten


def _functional(fn, *inputs):
    """The ATen graph AOTAutograd would hand over: functionalised, writes copied back."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functionalize

    return make_fx(functionalize(fn, remove="mutations_and_views"))(*inputs)


def _lists(n=3):
    return [torch.randn(4) for _ in range(n)], [torch.randn(4) for _ in range(n)]


def test_foreach_update_becomes_in_place_and_keeps_results():
    def step(ps, gs):
        torch._foreach_add_(ps, gs, alpha=-0.5)

    ps, gs = _lists()
    gm = _functional(step, ps, gs)
    result = ReinplacePass()(gm, Config())
    (found,) = result.findings
    assert isinstance(found, Reinplaced) and found.tensors == 3
    assert_ops(gm, {aten.copy_: 0, aten._foreach_add_: 1, aten._foreach_add: 0})
    mine, ref = [p.clone() for p in ps], [p.clone() for p in ps]
    gm(mine, gs)
    step(ref, gs)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b)


def test_fused_adam_becomes_in_place_and_matches_eager_kernel():
    kw = dict(lr=0.05, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=False,
              maximize=False)

    def step(p, g, m, v, s):  # eager reference
        torch._foreach_add_(s, 1)
        torch._fused_adamw_(p, g, m, v, [], s, **kw)

    def functional(p, g, m, v, s):  # what AOTAutograd hands over for it
        new_s = torch._foreach_add(s, 1)
        for a, b in zip(s, new_s):
            a.copy_(b)
        new_p, _, new_m, new_v, _ = torch.ops.aten._fused_adamw.default(
            p, g, m, v, [], new_s, **kw
        )
        for olds, news in ((p, new_p), (m, new_m), (v, new_v)):
            for a, b in zip(olds, news):
                a.copy_(b)

    def state():
        torch.manual_seed(1)
        n = 3
        return ([torch.randn(5) for _ in range(n)], [torch.randn(5) for _ in range(n)],
                [torch.rand(5) for _ in range(n)], [torch.rand(5) for _ in range(n)],
                [torch.tensor(float(k)) for k in range(n)])

    gm = aten_graph(functional, *state())
    result = ReinplacePass()(gm, Config())
    assert [type(f) for f in result.findings] == [Reinplaced, Reinplaced]
    assert_ops(gm, {aten.copy_: 0, aten._fused_adamw_: 1, aten._foreach_copy: 0})
    mine, ref = state(), state()
    gm(*mine)
    step(*ref)
    for xs, ys in zip(mine, ref):
        for a, b in zip(xs, ys):
            torch.testing.assert_close(a, b)


def test_old_value_read_after_the_update_blocks_the_rewrite():
    def step(ps, gs):
        torch._foreach_mul_(ps, 2.0)
        return [p + g for p, g in zip(ps, gs)]

    def reads_old(ps, gs):
        new = torch._foreach_mul(ps, 2.0)
        old_sum = ps[0] + 1  # reads ps[0] after the functional update: old value
        for p, n in zip(ps, new):
            p.copy_(n)
        return old_sum

    ps, gs = _lists(2)
    gm = aten_graph(reads_old, ps, gs)
    result = ReinplacePass()(gm, Config())
    (found,) = result.findings
    assert isinstance(found, ReinplaceSkipped) and "old value" in found.reason
    mine = [p.clone() for p in ps]
    torch.testing.assert_close(gm(mine, gs), ps[0] + 1)


def test_update_not_copied_back_is_left_alone():
    def partial(ps):
        new = torch._foreach_mul(ps, 3.0)
        ps[0].copy_(new[0])  # only the first element goes back
        return new[1]

    ps, _ = _lists(2)
    gm = aten_graph(partial, ps)
    (found,) = ReinplacePass()(gm, Config()).findings
    assert isinstance(found, ReinplaceSkipped)
