"""The pass pipeline: one table, in order, with the reason for each position.

``PRE_AOT`` runs once on the torch-level graph Dynamo captured; ``POST_AOT`` runs on every ATen
graph AOTAutograd produces (forward, backward, inference). Any pass can be disabled by name
(``Config.disable_passes``). In debug mode the graph is linted after every pass; with
``dump_dir`` its code is written before and after every pass.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Sequence

import torch.fx

from hpuopt.config import Config
from hpuopt.errors import PassError
from hpuopt.passes.base import CompileContext, GraphPass, PassResult, Stage
from hpuopt.passes.bucket_plan import BucketPlanPass
from hpuopt.passes.cleanup import CleanupPass
from hpuopt.passes.clip_scale import ClipScalePass
from hpuopt.passes.fused_adam import FusedAdamPass
from hpuopt.passes.fused_clip_norm import FusedClipNormPass
from hpuopt.passes.mark_step import MarkStepPass
from hpuopt.passes.masked_fill import MaskedFillPass
from hpuopt.passes.reinplace import ReinplacePass
from hpuopt.passes.split import SplitPass

log = logging.getLogger(__name__)

PRE_AOT: tuple[GraphPass, ...] = (
    # Both rewrites must see a whole optimizer step or clip, so they run before AOTAutograd
    # and before the split. Clip first: torch traces clip_grad_norm_ and opt.step() as separate
    # graphs, but a user's own step function may hold both.
    FusedClipNormPass(),
    # functional=True: every graph goes through AOTAutograd, whose functionalisation rejects
    # the in-place fused kernel; the out-of-place form plus copies back survives it.
    FusedAdamPass(functional=True),
)

POST_AOT: tuple[GraphPass, ...] = (
    # Before the split: functionalisation turned in-place optimizer kernels into functional ops
    # plus a copy per tensor; undo that while the whole update is still one graph.
    ReinplacePass(),
    # After reinplace, which leaves the clip's in-place multiply and the in-place fused Adam
    # kernel that reads its result side by side: the kernel scales the gradients itself.
    ClipScalePass(),
    # Before the split: a one-value boolean-mask assignment becomes a where, so the split
    # has no host read to cut there.
    MaskedFillPass(),
    # The split comes before every pass that works per piece.
    SplitPass(),
    # Per static piece: which dynamic dims may be padded to a bucket (reads the pieces' graphs).
    BucketPlanPass(),
    # After the split: boundaries go around the dynamic pieces it made.
    MarkStepPass(),
    # Last: dead-code elimination must see the final graph; it keeps impure nodes, so the
    # mark_step calls inserted above survive it.
    CleanupPass(),
)


def registry() -> dict[str, GraphPass]:
    """Every pass of the pipeline by name (the docs' pass reference is checked against it)."""
    return {p.name: p for p in (*PRE_AOT, *POST_AOT)}


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    graph_module: torch.fx.GraphModule
    results: dict[str, PassResult]
    skipped: tuple[str, ...]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall time of each pass that ran, by name (lint and recompile included)."""

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def run_pipeline(
    gm: torch.fx.GraphModule,
    config: Config,
    stage: Stage,
    graph_name: str = "graph",
    passes: Sequence[GraphPass] | None = None,
    ctx: CompileContext | None = None,
) -> PipelineResult:
    """Runs the passes of ``stage`` (or the given ``passes``) on ``gm`` in order.

    The pipeline owns what surrounds each pass: the enabled check (a disabled pass is listed in
    ``skipped``), its timing, and in debug mode the invariant checks and dumps. Each pass gets
    the same frozen ``ctx`` (by default: an inference graph on the device its metadata shows).
    """
    table = passes if passes is not None else (PRE_AOT if stage == "pre_aot" else POST_AOT)
    if ctx is None:
        kind = "dynamo" if stage == "pre_aot" else "inference"
        ctx = CompileContext.of(gm, kind=kind, name=graph_name, config=config)
    results: dict[str, PassResult] = {}
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    _dump(config, graph_name, 0, "input", gm)
    for step, p in enumerate(table, start=1):
        if not config.pass_enabled(p.name):
            skipped.append(p.name)
            continue
        start = time.perf_counter()
        result = p(gm, config, ctx)
        seconds[p.name] = time.perf_counter() - start
        gm = result.graph_module
        results[p.name] = result
        log.debug("pass %s on %s: modified=%s", p.name, graph_name, result.modified)
        if config.debug:
            check_graph(gm, p.name)
        _dump(config, graph_name, step, p.name, gm)
    return PipelineResult(gm, results, tuple(skipped), seconds)


def check_graph(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """The invariants every pass keeps (see docs/invariants.md), checked in debug mode."""
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises plain RuntimeErrors; name the pass that broke it
        raise PassError(pass_name, f"graph lint failed: {exc}") from exc
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise PassError(pass_name, f"graph has {len(outputs)} output nodes")
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            if isinstance(sub, torch.fx.GraphModule):
                check_graph(sub, pass_name)


def _dump(config: Config, graph_name: str, step: int, label: str, gm: torch.fx.GraphModule) -> None:
    if config.dump_dir is None:
        return
    os.makedirs(config.dump_dir, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", graph_name)
    path = os.path.join(config.dump_dir, f"{safe}.{step:02d}.{label}.py")
    with open(path, "w") as f:
        f.write(gm.print_readable(print_output=False))
    log.info("dumped %s", path)
