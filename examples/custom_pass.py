"""Writing your own graph pass, and unit-testing it without a device.

A pass is a frozen dataclass deriving from ``hpuopt.passes.base.GraphPass``: a ``name``, a
``stage`` (``"pre_aot"`` sees Dynamo's torch-level graph, ``"post_aot"`` each ATen graph), and a
``run(gm, config)`` that returns a ``PassResult(graph_module, modified, findings)``. It reads only
its graph and its ``Config``, prints nothing, and reports what it found as data.

Two passes here:

* ``GeluTanhPass`` (post_aot) rewrites exact GELU, ``aten.gelu(x)``, into its tanh approximation
  spelled out in elementwise ops, ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` — the kind of
  rewrite a backend does when one form has a faster kernel. It keeps ``meta["val"]`` and
  ``meta["stack_trace"]`` on the nodes it creates, so later passes and ``explain()`` still see
  shapes and source lines (docs/invariants.md, 7).
* ``OpCensusPass`` (post_aot) changes nothing and reports how many nodes call each op.

And the tests, written with ``hpuopt.testing``:

* ``aten_graph`` traces a function to the ATen graph a post_aot pass sees; run the pass on it,
  check op counts with ``assert_ops`` and the numbers against eager;
* ``RecordingBackend(post_aot=[GeluTanhPass(), *POST_AOT])`` runs the pass inside the real
  backend, followed by the normal pipeline, captures and replays on the CPU runtime, and keeps
  every graph before and after for inspection.

    python examples/custom_pass.py            # runs the tests and prints a summary
    python examples/custom_pass.py --short    # the same (it is already fast)
    python -m pytest examples/custom_pass.py  # the same tests under pytest
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
from typing import ClassVar

import torch
import torch.fx
import torch.nn as nn

from hpuopt import Config
from hpuopt.passes.base import GraphPass, PassResult
from hpuopt.pipeline import POST_AOT
from hpuopt.testing import RecordingBackend, assert_ops, aten_graph, count_ops

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class GeluRewrite:
    """Finding: one exact GELU node replaced by the tanh form."""

    node: str
    source: str | None


@dataclasses.dataclass(frozen=True)
class GeluTanhPass(GraphPass):
    name: ClassVar[str] = "gelu_tanh"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        found = []
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.gelu.default:
                continue
            if node.kwargs.get("approximate", "none") != "none":
                continue  # already the tanh form
            (x,) = node.args
            meta = {k: node.meta[k] for k in ("val", "stack_trace") if k in node.meta}

            def call(op, *args):
                new = graph.call_function(op, args)
                new.meta.update(meta)  # elementwise: same shape and dtype as the GELU
                return new

            with graph.inserting_before(node):
                cube = call(aten.pow.Tensor_Scalar, x, 3)
                inner = call(aten.add.Tensor, x, call(aten.mul.Tensor, cube, 0.044715))
                t = call(aten.tanh.default, call(aten.mul.Tensor, inner, math.sqrt(2 / math.pi)))
                half_x = call(aten.mul.Tensor, x, 0.5)
                out = call(aten.mul.Tensor, half_x, call(aten.add.Tensor, t, 1.0))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            found.append(GeluRewrite(node.name, meta.get("stack_trace", "").strip().splitlines()[-1]
                                     if meta.get("stack_trace") else None))
        if found:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(found), tuple(found))


@dataclasses.dataclass(frozen=True)
class OpCensusPass(GraphPass):
    """An analysis pass: the findings are ``(op name, count)`` pairs; the graph is untouched."""

    name: ClassVar[str] = "op_census"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        counts = collections.Counter(
            str(n.target) for n in gm.graph.nodes if n.op == "call_function"
        )
        return PassResult(gm, False, tuple(sorted(counts.items())))


# -- the tests -----------------------------------------------------------------------------------


def _mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x @ w1) @ w2


def test_rewrite_on_a_traced_graph():
    x, w1, w2 = torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 8)
    gm = aten_graph(_mlp, x, w1, w2)
    assert_ops(gm, {aten.gelu: 1, aten.tanh: 0})
    result = GeluTanhPass()(gm, Config())
    assert result.modified and len(result.findings) == 1
    assert_ops(result.graph_module, {aten.gelu: 0, aten.tanh: 1, aten.mm: 2})
    want = torch.nn.functional.gelu(x @ w1, approximate="tanh") @ w2
    torch.testing.assert_close(result.graph_module(x, w1, w2), want)
    # every node the pass made carries a fake value (invariant 7)
    assert all("val" in n.meta for n in result.graph_module.graph.nodes if n.op == "call_function")


def test_leaves_tanh_gelu_and_other_graphs_alone():
    gm = aten_graph(lambda x: torch.nn.functional.gelu(x, approximate="tanh") + x.sin(), torch.randn(3))
    result = GeluTanhPass()(gm, Config())
    assert not result.modified and result.findings == ()
    assert_ops(result.graph_module, {aten.gelu: 1})


def test_census_finds_without_changing():
    gm = aten_graph(_mlp, torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 8))
    code = gm.code
    result = OpCensusPass()(gm, Config())
    assert not result.modified and gm.code == code
    assert dict(result.findings) == {"aten.mm.default": 2, "aten.gelu.default": 1}


def test_inside_the_backend_with_the_normal_pipeline():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    backend = RecordingBackend(post_aot=[GeluTanhPass(), *POST_AOT])
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(5, 8)
    with torch.no_grad():
        got = [compiled(x), compiled(x)]  # capture, then replay
        want = model[2](torch.nn.functional.gelu(model[0](x), approximate="tanh"))
    for g in got:
        torch.testing.assert_close(g, want)
    (snap,) = backend.graphs("post_aot", kind="inference")
    assert count_ops(snap.before, aten.gelu) == 1
    assert_ops(snap.after, {aten.gelu: 0, aten.tanh: 1})  # counts descend into the pieces
    assert snap.result.results["gelu_tanh"].modified
    report = backend.explain()
    assert report.pieces[0].captured and report.pieces[0].replays == 2
    return snap, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="accepted for CI; the run is already short")
    p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tests = [test_rewrite_on_a_traced_graph, test_leaves_tanh_gelu_and_other_graphs_alone,
             test_census_finds_without_changing]
    for test in tests:
        test()
        print(f"ok  {test.__name__}")
    snap, report = test_inside_the_backend_with_the_normal_pipeline()
    print("ok  test_inside_the_backend_with_the_normal_pipeline")
    print("\nthe inference graph after gelu_tanh, split, bucket_plan, mark_step, cleanup:")
    # the piece's graph module: _modules, because the attribute is the runner that replays it
    print(snap.after._modules["submod_0"].code.strip())
    print("\n" + str(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
