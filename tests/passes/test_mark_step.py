"""The mark_step pass alone and through the backend; cleanup never removes its nodes."""

from __future__ import annotations

import torch
import torch.nn as nn

import hpuopt
from hpuopt import Config
from hpuopt.passes.base import CompileContext
from hpuopt.passes.cleanup import CleanupPass
from hpuopt.passes.mark_step import MarkStepPass, mark_step
from hpuopt.passes.split import SplitPass
from hpuopt.testing import aten_graph, count_ops, habana_standin


def _split(fn, *inputs):
    gm = aten_graph(fn, *inputs, tracing_mode="symbolic")
    return SplitPass()(gm, Config()).graph_module


def _mask_fn(x):
    y = x.sin()
    return y[y > 0].exp().sum() + x.cos().sum()


def test_boundaries_around_each_dynamic_piece():
    gm = _split(_mask_fn, torch.randn(8))
    result = MarkStepPass()(gm, Config())
    assert result.modified
    reasons = [m.reason for m in result.findings]
    assert any(r.startswith("before dynamic piece") for r in reasons)
    assert any(r.startswith("after dynamic piece") for r in reasons)
    order = [n for n in gm.graph.nodes if n.op == "call_module" or n.target is mark_step]
    dyn = next(i for i, n in enumerate(order) if n.op == "call_module" and not n.meta["hpuopt.piece"].static)
    assert order[dyn - 1].target is mark_step
    x = torch.randn(8)
    torch.testing.assert_close(gm(x), _mask_fn(x))


def test_static_graph_gets_no_boundary_but_backward_does():
    gm = _split(lambda x: x.sin() * 2, torch.randn(4))
    assert not MarkStepPass()(gm, Config()).modified
    result = MarkStepPass()(gm, Config(), CompileContext(kind="backward"))
    assert [m.reason for m in result.findings] == ["after the backward"]
    assert list(gm.graph.nodes)[-2].target is mark_step


def test_pipelining_fwd_bwd_marks_end_of_forward():
    gm = _split(lambda x: x.sin() * 2, torch.randn(4))
    forward = CompileContext(kind="forward")
    assert not MarkStepPass()(gm, Config(), forward).modified
    result = MarkStepPass()(gm, Config(pipelining_fwd_bwd=True), forward)
    assert [m.reason for m in result.findings] == ["end of forward (pipelining_fwd_bwd)"]


def test_optimizer_step_graph_is_bracketed():
    params = [torch.randn(3), torch.randn(2, 2)]
    grads = [torch.randn(3), torch.randn(2, 2)]

    def step(ps, gs):
        torch._foreach_add_(ps, gs, alpha=-0.1)
        return ps

    gm = _split(step, params, grads)
    result = MarkStepPass()(gm, Config())
    reasons = [m.reason for m in result.findings]
    assert reasons == ["before the optimizer step", "after the optimizer step"]


def test_cleanup_keeps_mark_steps_and_removes_dead_nodes():
    gm = _split(_mask_fn, torch.randn(8))
    MarkStepPass()(gm, Config())
    n_marks = count_ops(gm, mark_step)
    assert n_marks >= 2
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        dead = gm.graph.call_function(torch.ops.aten.sin.default, (next(iter(gm.graph.nodes)),))
    gm.graph.lint()
    result = CleanupPass()(gm, Config())
    assert dead.name in [f.node for f in result.findings]
    assert count_ops(gm, mark_step) == n_marks


def test_mark_step_runs_on_hpu_and_is_shown_by_explain(dynamic_op_flags):
    lin = nn.Linear(6, 6)

    def f(x):
        h = lin(x)
        return h[h > 0].sum() * h

    with habana_standin.installed(lazy=True) as standin, torch.no_grad():
        compiled = torch.compile(f, backend="hpugraph", options={"runtime": "hpu"})
        for _ in range(2):
            x = torch.randn(3, 6)
            torch.testing.assert_close(compiled(x), f(x))
        assert standin.calls.count("mark_step") >= 4  # two boundaries per call, warm-ups aside
    text = str(hpuopt.explain())
    assert "mark_step: before dynamic piece" in text
