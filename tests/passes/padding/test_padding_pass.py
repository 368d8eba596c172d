"""Padding analysis, the pass contract: ``PaddingAnalysisPass`` proposals and results, and the
forward and backward graphs AOTAutograd produces."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from padding_helpers import rand, reason_ops, trace

from hpuopt.config import Config
from hpuopt.passes.base import PassResult
from hpuopt.passes.padding import PaddingAnalysisPass
from hpuopt.records import PadSource


def test_pass_default_proposal_and_result() -> None:
    x, w = rand(5, 4), rand(6, 4, seed=1)
    gm = trace(lambda x, w: F.linear(x, w).relu(), x, w)
    before = gm.code
    result = PaddingAnalysisPass()(gm, Config())
    assert isinstance(result, PassResult) and result.modified is False
    assert result.graph_module is gm and gm.code == before
    (plan,) = result.findings
    # make_fx(symbolic) makes every dim symbolic: every dim of both inputs is proposed; padding
    # the weight's dim 0 would pad the output features, which meets nothing unpadded here.
    assert {v.source for v in plan.inputs} == {PadSource(i, d) for i in (0, 1) for d in (0, 1)}
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
    from torch._functorch.aot_autograd import aot_function, make_boxed_func

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
    # dynamic=True makes the feature dims symbolic too: the contraction over them is exact only
    # with both operands zero-padded alike.
    assert PadSource(0, 0) in fw_plan.padded
    contracted = {PadSource(0, 1), PadSource(1, 1)} <= set(fw_plan.padded)
    assert fw_plan.required_pad_value == (0.0 if contracted else None)
    assert {o.output for o in fw_plan.outputs} == set(range(6))  # output and saved activations
    # The backward sums the weight gradient over the batch: exact with zero-padded inputs only.
    (bw_plan,) = PaddingAnalysisPass().run(bw, Config()).findings
    assert len({v.source.input for v in bw_plan.inputs}) == 6
    assert all(bw_plan.verdict(v.source.input, 0).safe for v in bw_plan.inputs)
    assert bw_plan.required_pad_value == 0.0
    (strict,) = PaddingAnalysisPass(allow_zero_pad=False).run(bw, Config()).findings
    assert not strict.verdict(0, 0).safe and "aten.mm.default" in reason_ops(strict)
