"""Helpers to test hpuopt — and your own passes — without a device.

* :class:`RecordingBackend` compiles through the ``hpugraph`` backend (optionally with your own
  pass list) and keeps every graph before and after its pipeline;
* :func:`op_counts` / :func:`count_ops` / :func:`assert_ops` count ops in a graph, descending
  into the pieces of a split graph;
* :func:`aten_graph` traces a function to an ATen graph with fake-tensor metadata, the kind of
  graph a ``post_aot`` pass sees;
* ``hpuopt.counters.expect(graphs_captured=1)`` asserts counter deltas.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from hpuopt.backend import hpugraph_backend
from hpuopt.config import Config
from hpuopt.diagnostics.explain import ExplainReport, Session, explain
from hpuopt.passes.base import GraphPass
from hpuopt.pipeline import PipelineResult

__all__ = [
    "GraphSnapshot",
    "RecordingBackend",
    "assert_ops",
    "aten_graph",
    "count_ops",
    "op_counts",
]


@dataclasses.dataclass(frozen=True)
class GraphSnapshot:
    """One graph as a pipeline stage received it and as it left."""

    stage: str  # "pre_aot" | "post_aot"
    name: str  # "g0.dynamo", "g0.forward", "g0.backward", "g0.inference"
    before: torch.fx.GraphModule
    after: torch.fx.GraphModule
    result: PipelineResult


class RecordingBackend:
    """A ``torch.compile`` backend that runs hpugraph and records every graph.

    ``RecordingBackend(post_aot=[MyPass()])`` runs your passes in place of the ATen pipeline
    (the split included only if you list it); the static pieces are still captured and replayed
    on the CPU runtime, so a pass that breaks semantics shows up as a wrong result.
    """

    def __init__(
        self,
        options: Mapping[str, Any] | None = None,
        pre_aot: Sequence[GraphPass] | None = None,
        post_aot: Sequence[GraphPass] | None = None,
    ) -> None:
        self.config = Config.from_options(options, environ={})
        self.session = Session()
        self.snapshots: list[GraphSnapshot] = []
        self._passes: dict[str, Sequence[GraphPass]] = {}
        if pre_aot is not None:
            self._passes["pre_aot"] = list(pre_aot)
        if post_aot is not None:
            self._passes["post_aot"] = list(post_aot)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        return hpugraph_backend(
            gm,
            example_inputs,
            config=self.config,
            session=self.session,
            passes=self._passes,
            observer=self._observe,
        )

    def _observe(
        self, stage: str, name: str, before: torch.fx.GraphModule, result: PipelineResult
    ) -> None:
        self.snapshots.append(GraphSnapshot(stage, name, before, result.graph_module, result))

    def graphs(self, stage: str | None = None, kind: str | None = None) -> list[GraphSnapshot]:
        """Snapshots filtered by stage and by kind (the suffix of the name: "forward", ...)."""
        return [
            s
            for s in self.snapshots
            if (stage is None or s.stage == stage)
            and (kind is None or s.name.rsplit(".", 1)[-1] == kind)
        ]

    def explain(self) -> ExplainReport:
        return explain(self.session)


def _op_key(target: Any) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", str(target))


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter[str]:
    """``call_function`` targets by name (``"aten.mm.default"``), descending into submodules."""
    counts: collections.Counter[str] = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counts[_op_key(node.target)] += 1
        elif node.op == "call_module":
            sub = gm._modules.get(node.target)  # not getattr: a PieceRunner may shadow it
            if isinstance(sub, torch.fx.GraphModule):
                counts.update(op_counts(sub))
    return counts


def count_ops(gm: torch.fx.GraphModule, ops: Any | Iterable[Any]) -> int:
    """How many nodes call any of ``ops`` (OpOverload, OpOverloadPacket, function or name)."""
    if not isinstance(ops, (list, tuple, set, frozenset)):
        ops = [ops]
    names = set()
    for op in ops:
        names.add(op if isinstance(op, str) else _op_key(op))
    total = 0
    for name, n in op_counts(gm).items():
        packet = name.rsplit(".", 1)[0]
        if name in names or packet in names:
            total += n
    return total


def assert_ops(gm: torch.fx.GraphModule, expected: Mapping[Any, int]) -> None:
    """Asserts exact counts per op, e.g. ``assert_ops(gm, {torch.ops.aten.nonzero: 1})``."""
    wrong = {}
    for op, n in expected.items():
        got = count_ops(gm, op)
        if got != n:
            wrong[op if isinstance(op, str) else _op_key(op)] = (n, got)
    if wrong:
        detail = ", ".join(f"{k}: expected {e}, got {g}" for k, (e, g) in wrong.items())
        raise AssertionError(f"op counts differ: {detail}\n{gm.code}")


def aten_graph(
    fn: Callable[..., Any], *example_inputs: Any, tracing_mode: str = "fake"
) -> torch.fx.GraphModule:
    """Traces ``fn`` to an ATen graph whose nodes carry ``meta["val"]`` and, where this torch
    records them, ``meta["stack_trace"]`` (``make_fx``)."""
    import inspect

    from torch.fx.experimental.proxy_tensor import make_fx

    kwargs: dict[str, Any] = {"tracing_mode": tracing_mode}
    if "record_stack_traces" in inspect.signature(make_fx).parameters:
        kwargs["record_stack_traces"] = True
    return make_fx(fn, **kwargs)(*example_inputs)
