"""Remove dead nodes from the stitching graph, keeping everything with a side effect.

What it finds: nodes whose results nobody uses (unpacked outputs that are never read, leftover
size reads). What it changes: erases them, in reverse order, with ``Graph.eliminate_dead_code``,
which asks ``Node.is_impure()`` before erasing. What it guarantees: in-place updates, asserts and
the ``mark_step`` calls the previous pass inserted are never removed.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch.fx

from hpuopt.config import Config
from hpuopt.passes.base import GraphPass, PassResult
from hpuopt.records import Finding


@dataclasses.dataclass(frozen=True)
class DeadNodeRemoved(Finding):
    """A node nobody used, erased."""

    pass_name: ClassVar[str] = "cleanup"
    node: str
    reason: str = "result never used"


@dataclasses.dataclass(frozen=True)
class CleanupPass(GraphPass):
    name: ClassVar[str] = "cleanup"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        before = [n.name for n in gm.graph.nodes]
        changed = gm.graph.eliminate_dead_code()
        after = {n.name for n in gm.graph.nodes}
        removed = tuple(DeadNodeRemoved(n) for n in before if n not in after)
        return PassResult(gm, changed, removed)
