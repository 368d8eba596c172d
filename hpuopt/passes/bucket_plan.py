"""Plan, per static piece, which dynamic dimensions may be padded up to a bucket.

What it finds: for each static piece of a split graph, the proposal "every symbolic dim of every
activation input" (batch, sequence, KV length, data-dependent counts; ``padding.plan_padding``)
judged by the padding-safety analysis (``padding.analyze_padding``). What it changes: nothing in the graph; it attaches the
:class:`~hpuopt.passes.padding.PaddingPlan` to the piece's ``call_module`` node as
``meta["hpuopt.padding"]``, where the backend reads it to give the piece's runner a bucket
policy. Pieces whose plan pads nothing are captured per exact shape; the plan says why.

Runs after the split (it analyses pieces, not the whole graph) and before ``mark_step``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch.fx

from hpuopt.config import Config
from hpuopt.passes.base import GraphPass, PassResult
from hpuopt.passes.padding import plan_padding
from hpuopt.records import PiecePadding


@dataclasses.dataclass(frozen=True)
class BucketPlanPass(GraphPass):
    name: ClassVar[str] = "bucket_plan"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        if not config.padding:
            return PassResult(gm, False, ())
        found = []
        for node in gm.graph.find_nodes(op="call_module"):
            info = node.meta.get("hpuopt.piece")
            if info is None or not info.static:
                continue
            piece = gm._modules[node.target]
            plan = plan_padding(piece)
            if plan is None:
                continue
            node.meta["hpuopt.padding"] = plan
            found.append(PiecePadding(node.target, plan))
        return PassResult(gm, False, tuple(found))
