"""Insert ``mark_step`` boundaries for Gaudi's lazy mode.

In lazy mode the HPU queues ops until ``mark_step()`` (or a host read) flushes them to the
device as one graph. hpuopt marks a step where lazy-mode practice puts one:

* around every dynamic piece of a split graph, so the static pieces on either side are flushed
  as whole graphs and the dynamic op does not merge into them;
* at the end of a backward graph (the gradients are complete);
* before and after an optimizer step (a graph that updates parameters in place);
* with ``pipelining_fwd_bwd``, at the end of the forward graph too, so the device runs the
  forward while the host prepares the backward.

What it changes::

    %submod_0 = call_module[submod_0](%x)            %submod_0 = call_module[submod_0](%x)
    %submod_1 = call_module[submod_1](%getitem)  ->  %mark_step = mark_step("hpu")
                                                     %submod_1 = call_module[submod_1](...)
                                                     %mark_step_1 = mark_step("hpu")

What it guarantees: :func:`mark_step` is registered with ``torch.fx`` as side-effectful, so
``Node.is_impure()`` holds for every inserted node and no dead-code elimination removes it. On
CUDA and CPU it does nothing at run time but stays visible in the graph and in ``explain()``.
On a Gaudi in the bridge's compile mode (``PT_HPU_LAZY_MODE=0``, ``Config.hpu_mode``) the pass
inserts nothing: there is no lazy queue, and the bridge's ``mark_step`` is lazy-only
(``habana_frameworks/torch/core/step_closure.py``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

import torch
import torch.fx

from hpuopt.config import Config
from hpuopt.fx_utils import packet_name
from hpuopt.passes.base import CompileContext, GraphPass, PassResult
from hpuopt.records import Finding


@torch.fx.node.has_side_effect
def mark_step(device_type: str) -> None:
    """Flushes Gaudi's lazy-mode queue when the graph runs on an HPU; a no-op elsewhere."""
    if device_type == "hpu":
        importlib.import_module("habana_frameworks.torch.core").mark_step()


@dataclasses.dataclass(frozen=True)
class MarkStepInserted(Finding):
    """One inserted boundary: after which node (``None``: at the start) and why."""

    pass_name: ClassVar[str] = "mark_step"
    after: str | None
    reason: str

    @property
    def node(self) -> str | None:
        return self.after


@dataclasses.dataclass(frozen=True)
class MarkStepPass(GraphPass):
    """Inserts ``mark_step`` calls into a split graph (see the module docstring)."""

    name: ClassVar[str] = "mark_step"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config, ctx: CompileContext) -> PassResult:
        kind, device = ctx.kind, ctx.device
        if device == "hpu" and config.hpu_execution_mode != "lazy":
            # the bridge's compile mode has no lazy queue to flush (its mark_step is lazy-only)
            return PassResult(gm, False, ())
        wanted: dict[torch.fx.Node | None, str] = {}  # insert after this node (None: first)
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        last_placeholder = placeholders[-1] if placeholders else None
        output = nodes[-1]
        for node in nodes:
            info = node.meta.get("hpuopt.piece")
            if node.op == "call_module" and info is not None and not info.static:
                wanted.setdefault(node.prev, f"before dynamic piece {node.target}")
                wanted.setdefault(_last_use_site(node), f"after dynamic piece {node.target}")
        if _is_optimizer_step(gm):
            wanted.setdefault(last_placeholder, "before the optimizer step")
            wanted.setdefault(output.prev, "after the optimizer step")
        if kind == "backward":
            wanted.setdefault(output.prev, "after the backward")
        if kind == "forward" and config.pipelining_fwd_bwd:
            wanted.setdefault(output.prev, "end of forward (pipelining_fwd_bwd)")
        inserted = []
        for after, reason in wanted.items():
            if after is not None and after.op == "placeholder" and after is not last_placeholder:
                after = last_placeholder
            if after is not None and after.target is mark_step:
                continue  # a boundary is already there
            anchor = after if after is not None else nodes[0]
            ctx = gm.graph.inserting_after(anchor) if after is not None else gm.graph.inserting_before(anchor)
            with ctx:
                gm.graph.call_function(mark_step, (device,))
            inserted.append(MarkStepInserted(after.name if after is not None else None, reason))
        return PassResult(gm, bool(inserted), tuple(inserted))


def _last_use_site(node: torch.fx.Node) -> torch.fx.Node:
    """The node after which ``node``'s results have been unpacked (its trailing getitems)."""
    last = node
    while last.next.op == "call_function" and last.next.args and last.next.args[0] is node:
        last = last.next
    return last


_OPTIMIZER_OPS = ("_fused_adam", "_fused_adamw", "_fused_sgd", "_foreach_add_", "_foreach_mul_")


def _is_optimizer_step(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph (or one of its pieces) holds a fused or multi-tensor parameter update."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if packet_name(node).startswith(_OPTIMIZER_OPS):
                return True
        elif node.op == "call_module":
            sub = gm._modules.get(node.target)
            if isinstance(sub, torch.fx.GraphModule) and _is_optimizer_step(sub):
                return True
    return False
