"""The ``hpugraph`` TorchDynamo backend.

Dynamo hands :func:`hpugraph_backend` one FX graph with example inputs. The backend

1. builds the :class:`~hpuopt.config.Config` (options over ``HPUOPT_*`` variables);
2. runs the ``pre_aot`` passes on the whole torch-level graph;
3. lowers it with AOTAutograd — forward and backward graphs when training, one inference graph
   otherwise — keeping input mutations in inference graphs;
4. runs the ``post_aot`` passes on each ATen graph (the split first), and
5. stands a :class:`~hpuopt.runtime.runner.PieceRunner` in for every static piece, so the
   stitching graph replays captured graphs and runs dynamic pieces as is between them.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd

from hpuopt.config import Config
from hpuopt.diagnostics.counters import counters
from hpuopt.diagnostics.explain import (
    AotGraphRecord,
    GraphRecord,
    PieceRecord,
    Session,
    default_session,
)
from hpuopt.fx_utils import output_node
from hpuopt.passes.base import CompileContext, GraphPass
from hpuopt.passes.split import build_pieces
from hpuopt.pipeline import PipelineResult, run_pipeline
from hpuopt.records import PieceInfo
from hpuopt.runtime import select_runtime
from hpuopt.runtime.base import eager_forward
from hpuopt.runtime.compilers import PieceCompiler, select_piece_compiler
from hpuopt.runtime.lending import lent_positions
from hpuopt.runtime.direct import DirectRunner
from hpuopt.runtime.runner import PieceRunner

log = logging.getLogger(__name__)

# Called after each pipeline run with (stage, graph name, graph before, result); used by
# hpuopt.testing.RecordingBackend.
Observer = Callable[[str, str, torch.fx.GraphModule, PipelineResult], None]


def hpugraph_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    *,
    session: Session | None = None,
    config: Config | None = None,
    passes: Mapping[str, Sequence[GraphPass]] | None = None,
    observer: Observer | None = None,
) -> Callable[..., Any]:
    """The backend registered as ``"hpugraph"``: ``torch.compile(m, backend="hpugraph")``.

    ``passes`` replaces the pipeline of a stage (``{"post_aot": [...]}``) and ``observer`` sees
    every graph before and after its pipeline: both exist for :mod:`hpuopt.testing`.
    """
    passes = passes or {}
    config = config if config is not None else Config.from_options(options)
    session = session if session is not None else default_session
    record = session.new_graph(num_nodes=len(gm.graph.nodes))
    counters.dynamo_graphs += 1
    name = f"g{record.index}.dynamo"
    start = time.perf_counter()
    before = _snapshot(gm) if observer else gm
    ctx = CompileContext.of(gm, kind="dynamo", name=name, config=config)
    pre = run_pipeline(gm, config, "pre_aot", graph_name=name, passes=passes.get("pre_aot"), ctx=ctx)
    if observer:
        observer("pre_aot", name, before, pre)
    record.pre_aot = {name: r.modified for name, r in pre.results.items()}
    record.findings = {name: r.findings for name, r in pre.results.items()}
    record.seconds = dict(pre.seconds)

    def compiler(kind: str) -> Callable[..., Any]:
        def compile_one(aot_gm: torch.fx.GraphModule, aot_inputs: Sequence[Any]) -> Any:
            return compile_aot_graph(
                aot_gm, aot_inputs, config, kind, record, passes.get("post_aot"), observer
            )

        return compile_one

    lower = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        keep_inference_input_mutations=True,
    )
    try:
        compiled = lower(pre.graph_module, example_inputs)
        record.backend_seconds = time.perf_counter() - start
        return compiled
    except BaseException:
        # Dynamo may abandon this attempt (a restart with new specialisations) and call us
        # again: a record without compiled graphs would only confuse explain().
        session.discard(record)
        raise


def compile_aot_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: Config,
    kind: str,
    record: GraphRecord,
    passes: Sequence[GraphPass] | None = None,
    observer: Observer | None = None,
) -> Callable[[list[Any]], Any]:
    """Splits one ATen graph, wires a runner into each static piece, returns a boxed callable."""
    start = time.perf_counter()
    counters.aot_graphs += 1
    name = f"g{record.index}.{kind}"
    before = _snapshot(gm) if observer else gm
    ctx = CompileContext.of(gm, kind=kind, name=name, config=config)  # type: ignore[arg-type]
    result = run_pipeline(gm, config, "post_aot", graph_name=name, passes=passes, ctx=ctx)
    if observer:
        observer("post_aot", name, before, result)
    split_gm = result.graph_module
    if "split" not in result.results:  # split disabled: the whole graph is one static piece
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        split_gm, _ = build_pieces(gm, {n: 0 for n in nodes}, {})
    runtime = select_runtime(config, example_inputs)
    aot_record = AotGraphRecord(
        kind=kind,
        runtime=runtime.name,
        pieces=[],
        passes={n: r.modified for n, r in result.results.items()},
        findings={n: r.findings for n, r in result.results.items()},
        seconds=dict(result.seconds),
        module=split_gm,
    )
    record.aot_graphs.append(aot_record)
    static_idx = _static_input_indices(kind, len(example_inputs))
    lent = _lent_positions(kind, split_gm)
    compiler = select_piece_compiler(config, runtime)
    _stand_in_runners(split_gm, aot_record, runtime, config, static_idx, name, compiler, lent)
    forward = eager_forward(split_gm)
    # One call at a time per graph: a piece's output buffers stay live until the next piece
    # has copied them, so concurrent callers must not interleave anywhere inside the graph.
    lock = threading.Lock()

    def run(args: list[Any]) -> Any:
        with lock:
            return forward(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    aot_record.compile_seconds = time.perf_counter() - start
    return run


def _stand_in_runners(
    split_gm: torch.fx.GraphModule,
    aot_record: AotGraphRecord,
    runtime: Any,
    config: Config,
    static_idx: frozenset[int],
    name: str,
    compiler: PieceCompiler,
    lent: frozenset[int] = frozenset(),
) -> None:
    """Puts a :class:`PieceRunner` in place of every static piece of ``split_gm``; ``lent``
    are the positions of ``split_gm``'s outputs that may be lent (see :func:`_lent_positions`)."""
    placeholders = {n: i for i, n in enumerate(split_gm.graph.find_nodes(op="placeholder"))}
    # a runtime without device graphs calls each key's compiled piece on the caller's tensors
    runner_class = PieceRunner if getattr(runtime, "captures", True) else DirectRunner
    at_output = _output_positions(split_gm)
    for node in split_gm.graph.find_nodes(op="call_module"):
        info: PieceInfo = node.meta["hpuopt.piece"]
        if not info.static:
            counters.pieces_dynamic += 1
            aot_record.pieces.append(PieceRecord(info))
            # run as is, but without nn.Module.__call__ (its hooks are never set here)
            split_gm.__dict__[node.target] = eager_forward(split_gm._modules[node.target])
            continue
        counters.pieces_static += 1
        stable = [
            isinstance(a, torch.fx.Node) and placeholders.get(a, -1) in static_idx
            for a in node.args
        ]
        runner = runner_class(
            name=f"{name}.{node.target}",
            gm=split_gm.get_submodule(node.target),
            runtime=runtime,
            config=config,
            stable=stable,
            escaping=_escaping_outputs(node),
            padding=node.meta.get("hpuopt.padding"),
            compiler=compiler,
            lend=_lendable_outputs(node, at_output, lent),
        )
        # The stitching code calls ``self.submod_k(...)``; an instance attribute shadows the
        # registered submodule, so the call skips nn.Module.__call__ and lands in the runner.
        split_gm.__dict__[node.target] = runner
        aot_record.pieces.append(PieceRecord(info, runner))
    log.info(
        "%s: %d pieces (%d captured) on the %s runtime, compiled by %s",
        name,
        len(aot_record.pieces),
        sum(p.runner is not None for p in aot_record.pieces),
        runtime.name,
        compiler.name,
    )


def _snapshot(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm``'s graph sharing its submodules and parameters (passes rewrite graphs)."""
    import copy

    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _static_input_indices(kind: str, num_inputs: int) -> frozenset[int]:
    """Inputs of this ATen graph that are parameters or buffers (stable addresses)."""
    if kind == "backward":
        return frozenset()
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
    indices = getattr(meta, "static_input_indices", None) or ()
    return frozenset(i for i in indices if i < num_inputs)


def _lent_positions(kind: str, split_gm: torch.fx.GraphModule) -> frozenset[int]:
    """The outputs of this ATen graph that only autograd receives: a forward's activations
    saved for backward, a backward's gradients (:func:`hpuopt.runtime.lending.lent_positions`)."""
    from torch._guards import TracingContext

    result = output_node(split_gm).args[0]
    if not isinstance(result, (tuple, list)):
        return frozenset()
    ctx = TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None and kind == "forward" else None
    return lent_positions(kind, len(result), meta)


def _output_positions(split_gm: torch.fx.GraphModule) -> dict[torch.fx.Node, list[int]]:
    """Where each value appears in the stitching graph's output (one value may be returned at
    several positions: a user output also saved for backward)."""
    result = output_node(split_gm).args[0]
    positions: dict[torch.fx.Node, list[int]] = {}
    if isinstance(result, (tuple, list)):
        for i, value in enumerate(result):
            if isinstance(value, torch.fx.Node):
                positions.setdefault(value, []).append(i)
    return positions


def _lendable_outputs(
    node: torch.fx.Node, at_output: Mapping[torch.fx.Node, list[int]], lent: frozenset[int]
) -> list[bool]:
    """For each output of a static piece: may it be lent? Only when everything it reaches
    outside captured code is a lendable position of the graph's output."""
    if not lent:
        return []
    sub = node.graph.owning_module._modules[node.target]  # not getattr: runners shadow it
    result = output_node(sub).args[0]
    if not isinstance(result, (tuple, list)):
        return [_only_lent(node, at_output, lent)]
    out = [False] * len(result)
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem):
            return [False] * len(result)
        out[user.args[1]] = _only_lent(user, at_output, lent)
    return out


def _only_lent(
    value: torch.fx.Node, at_output: Mapping[torch.fx.Node, list[int]], lent: frozenset[int]
) -> bool:
    """Whether ``value`` escapes, and only to lendable output positions."""
    escapes = False
    for user in value.users:
        if user.op == "call_module":
            info = user.meta.get("hpuopt.piece")
            if info is not None and info.static:
                continue  # copied into the next piece's static inputs in the same call
            return False
        if user.op != "output":
            return False
        escapes = True
    return escapes and all(i in lent for i in at_output.get(value, ()))


def _escaping_outputs(node: torch.fx.Node) -> list[bool]:
    """For each output of a static piece: does it leave captured code in this call?"""
    sub = node.graph.owning_module._modules[node.target]  # not getattr: runners shadow it
    result = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    if not isinstance(result, (tuple, list)):
        return [_escapes(node)]
    out = [False] * len(result)
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            out[user.args[1]] = out[user.args[1]] or _escapes(user)
        else:  # the tuple itself is used: everything escapes
            return [True] * len(result)
    return out


def _escapes(value: torch.fx.Node) -> bool:
    for user in value.users:
        if user.op != "call_module":
            return True
        info = user.meta.get("hpuopt.piece")
        if info is None or not info.static:
            return True
    return False
