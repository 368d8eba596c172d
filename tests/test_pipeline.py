"""The pipeline and the pass contract: the enabled check, lint and recompile, timings and the
compile context live in one place, not in each pass."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.fx

from hpuopt import Config
from hpuopt.errors import PassError
from hpuopt.passes.base import CompileContext, GraphPass, PassResult
from hpuopt.pipeline import POST_AOT, PRE_AOT, registry, run_pipeline
from hpuopt.records import Finding
from hpuopt.testing import aten_graph

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class SeenContext(Finding):
    pass_name: ClassVar[str] = "spy"
    context: CompileContext
    node: str | None = None
    reason: str = "saw a context"


@dataclasses.dataclass(frozen=True)
class ContextSpy(GraphPass):
    name: ClassVar[str] = "spy"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm, config, ctx):
        return PassResult(gm, False, (SeenContext(ctx),))


@dataclasses.dataclass(frozen=True)
class SinToCos(GraphPass):
    """Edits the graph and leaves the recompile to the base class."""

    name: ClassVar[str] = "sin_to_cos"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm, config):  # the two-argument form: no context needed
        changed = False
        for node in gm.graph.nodes:
            if node.target is aten.sin.default:
                node.target = aten.cos.default
                changed = True
        return PassResult(gm, changed, ())


@dataclasses.dataclass(frozen=True)
class BreaksTheGraph(GraphPass):
    name: ClassVar[str] = "breaker"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm, config):
        last = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        first = next(n for n in gm.graph.nodes if n.op == "call_function")
        with gm.graph.inserting_before(first):  # a use before its definition fails lint
            gm.graph.call_function(aten.neg.default, (last,))
        return PassResult(gm, True, ())


def test_base_recompiles_a_modified_graph():
    gm = aten_graph(lambda x: torch.sin(x) + 1, torch.randn(5))
    x = torch.randn(5)
    result = SinToCos()(gm, Config())
    assert result.modified
    torch.testing.assert_close(result.graph_module(x), torch.cos(x) + 1)


def test_a_disabled_pass_leaves_the_graph_alone_when_called_directly():
    gm = aten_graph(lambda x: torch.sin(x) + 1, torch.randn(5))
    x = torch.randn(5)
    result = SinToCos()(gm, Config(disable_passes=("sin_to_cos",)))
    assert not result.modified
    torch.testing.assert_close(result.graph_module(x), torch.sin(x) + 1)


def test_lint_failure_names_the_pass():
    gm = aten_graph(lambda x: torch.sin(x) + 1, torch.randn(5))
    with pytest.raises(PassError, match="breaker"):
        BreaksTheGraph()(gm, Config())


def test_pipeline_hands_every_pass_the_same_context_and_times_it():
    gm = aten_graph(lambda x: torch.sin(x) + 1, torch.randn(5))
    ctx = CompileContext(kind="backward", device="cpu", name="g7.backward")
    result = run_pipeline(gm, Config(), "post_aot", passes=[ContextSpy(), SinToCos()], ctx=ctx)
    (seen,) = result.results["spy"].findings
    assert seen.context is ctx
    assert set(result.seconds) == {"spy", "sin_to_cos"}
    assert all(s >= 0 for s in result.seconds.values())
    assert result.total_seconds == pytest.approx(sum(result.seconds.values()))


def test_pipeline_lists_disabled_passes_as_skipped():
    gm = aten_graph(lambda x: torch.sin(x) + 1, torch.randn(5))
    config = Config(disable_passes=("sin_to_cos",))
    result = run_pipeline(gm, config, "post_aot", passes=[ContextSpy(), SinToCos()])
    assert result.skipped == ("sin_to_cos",) and "sin_to_cos" not in result.seconds


def test_default_context_reads_device_from_metadata_unless_the_config_names_one():
    gm = aten_graph(lambda x: torch.sin(x) + 1, torch.randn(5))
    assert CompileContext.of(gm).device == "cpu"
    assert CompileContext.of(gm, config=Config(runtime="hpu")).device == "hpu"


def test_default_context_of_a_cuda_graph_is_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        x = torch.empty(4, device="cuda")
    gm = make_fx(lambda t: torch.sin(t) * 2, tracing_mode="fake")(x)
    assert CompileContext.of(gm, kind="forward").device == "cuda"


def test_registry_holds_every_pass_of_both_stages_once():
    names = [p.name for p in (*PRE_AOT, *POST_AOT)]
    assert len(names) == len(set(names)) == len(registry())


def test_the_context_of_a_dynamo_graph_reads_its_example_values():
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.sin, (x,))
    graph.output(y)
    with FakeTensorMode():
        value = torch.empty(3, device="cuda")
    x.meta["example_value"] = y.meta["example_value"] = value  # Dynamo's key, not "val"
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert CompileContext.of(gm, kind="dynamo").device == "cuda"
