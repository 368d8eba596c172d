"""Fold the clip's gradient scaling into the fused Adam kernel that reads the gradients next.

What it finds
    ``clip_grad_norm_`` followed by an Adam/AdamW step, after the fused rewrites and
    :mod:`hpuopt.passes.reinplace`, is::

        aten._foreach_mul_.Tensor([%g0, %g1, ...], %coef)          # the clip: grads *= coef
        ...
        aten._fused_adam_.default([%p0, ...], [%g0, %g1, ...], ..., lr=..., ...)

    Two passes over every gradient where one would do: the fused kernels take a ``grad_scale``
    tensor, divide each gradient by it, write the result back into the gradient and update
    with it, all in the pass they already make (what ``GradScaler`` uses to unscale for free).

What it changes
    The multiply goes; each fused kernel that reads the scaled gradients gets
    ``grad_scale = reciprocal(coef)`` (one scalar op). One multi-tensor kernel and its pass over
    every gradient fewer per step.

What it guarantees
    Only where nothing else can tell: every node after the multiply that touches a scaled
    gradient is such a fused kernel, reading it as a gradient only, with no ``grad_scale`` or
    ``found_inf`` of its own; every scaled gradient is read by one of them, and every gradient
    those kernels read was scaled; ``coef`` is a float32 scalar (the kernels read the scale as
    float) on the gradients' device, and the device is one whose kernel writes the divided
    gradient back (CPU, CUDA), so ``.grad`` holds the clipped gradient afterwards, as in eager.
    ``g / (1 / coef)`` may differ from ``g * coef`` in the last bit when the clip is active
    (never when it is not: ``coef`` is then exactly 1), the same order of difference as the fused
    kernel itself against the for-loop update. Anything else is left alone, with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.fx

from hpuopt.config import Config
from hpuopt.passes.base import GraphPass, PassResult
from hpuopt.records import Finding

aten = torch.ops.aten

_FUSED_ADAM = frozenset(
    {aten._fused_adam_.default, aten._fused_adam_.tensor_lr,
     aten._fused_adamw_.default, aten._fused_adamw_.tensor_lr}
)
# devices whose fused Adam kernels write the divided gradient back into ``grads``
_WRITES_GRADS_BACK = frozenset({"cpu", "cuda"})


@dataclasses.dataclass(frozen=True)
class ClipScaleFolded(Finding):
    pass_name: ClassVar[str] = "clip_scale"
    scale: str
    """The removed ``_foreach_mul_`` node."""
    kernels: tuple[str, ...]
    """The fused kernels that now scale the gradients themselves."""
    tensors: int

    @property
    def node(self) -> str:
        return self.scale

    @property
    def reason(self) -> str:
        return f"the clip's scale of {self.tensors} gradient(s) became the fused kernels' grad_scale"


@dataclasses.dataclass(frozen=True)
class ClipScaleKept(Finding):
    pass_name: ClassVar[str] = "clip_scale"
    applied: ClassVar[bool] = False
    scale: str
    reason: str

    @property
    def node(self) -> str:
        return self.scale


@dataclasses.dataclass(frozen=True)
class ClipScalePass(GraphPass):
    name: ClassVar[str] = "clip_scale"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        findings: list[Any] = []
        nodes = list(gm.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        for node in nodes:
            if node.op == "call_function" and node.target is aten._foreach_mul_.Tensor:
                if _feeds_fused_adam(node, order):
                    findings.append(_fold(gm, node, order))
        changed = any(isinstance(f, ClipScaleFolded) for f in findings)
        return PassResult(gm, changed, tuple(findings))


def _feeds_fused_adam(mul: torch.fx.Node, order: dict[torch.fx.Node, int]) -> bool:
    """Is some later reader of the scaled tensors a fused Adam kernel? (Otherwise this multiply
    is not a clip before a step, and not worth a finding.)"""
    grads = mul.args[0]
    if not isinstance(grads, (list, tuple)):
        return False
    for t in grads:
        for user in getattr(t, "users", ()):
            if order.get(user, -1) > order[mul] and user.target in _FUSED_ADAM:
                return True
    return False


def _fold(
    gm: torch.fx.GraphModule, mul: torch.fx.Node, order: dict[torch.fx.Node, int]
) -> ClipScaleFolded | ClipScaleKept:
    def keep(reason: str) -> ClipScaleKept:
        return ClipScaleKept(mul.name, reason)

    grads, coef = mul.args[0], mul.args[1]
    if mul.users:
        return keep("the multiply's result is used")
    if not all(isinstance(g, torch.fx.Node) for g in grads):
        return keep("the scaled list holds something other than graph values")
    if len(set(grads)) != len(grads):
        return keep("a gradient is scaled twice")
    val = coef.meta.get("val") if isinstance(coef, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 0 or val.dtype != torch.float32:
        return keep("the scale is not a float32 scalar tensor")
    device = val.device
    if device.type not in _WRITES_GRADS_BACK:
        return keep(f"the fused kernel on {device.type} may not write the gradients back")
    scaled = set(grads)
    kernels: list[torch.fx.Node] = []
    for g in grads:
        gval = g.meta.get("val")
        if not isinstance(gval, torch.Tensor) or gval.device != device:
            return keep(f"{g.name} is not on the scale's device")
        for user in g.users:
            if user is mul or order.get(user, len(order)) < order[mul]:
                continue  # nodes this pass added (not in ``order``) count as later readers
            if user.target not in _FUSED_ADAM:
                return keep(f"{user.name} reads {g.name} after it is scaled")
            if user not in kernels:
                kernels.append(user)
    if not kernels:
        return keep("no fused Adam kernel reads the scaled gradients")
    covered: set[torch.fx.Node] = set()
    for k in kernels:
        if k.kwargs.get("grad_scale") is not None or k.kwargs.get("found_inf") is not None:
            return keep(f"{k.name} already has a grad_scale or found_inf")
        if len(k.args) > 6 or not isinstance(k.args[1], (list, tuple)):
            return keep(f"{k.name} passes its options positionally or its gradients as one value")
        k_grads = list(k.args[1])
        if not set(k_grads) <= scaled:
            return keep(f"{k.name} also reads gradients the clip did not scale")
        if any(g in scaled for j, lst in enumerate(k.args) if j != 1
               for g in (lst if isinstance(lst, (list, tuple)) else [lst])):
            return keep(f"{k.name} reads a scaled gradient as something other than a gradient")
        covered.update(k_grads)
    if covered != scaled:
        return keep("some scaled gradients are read by no fused kernel")
    first = min(kernels, key=lambda k: order.get(k, len(order)))
    with gm.graph.inserting_before(first):
        scale = gm.graph.call_function(aten.reciprocal.default, (coef,))
    scale.meta["val"] = val  # a float32 scalar on the same device, like its reciprocal
    for k in kernels:
        k.kwargs = {**k.kwargs, "grad_scale": scale}
    gm.graph.erase_node(mul)
    return ClipScaleFolded(mul.name, tuple(k.name for k in kernels), len(grads))
