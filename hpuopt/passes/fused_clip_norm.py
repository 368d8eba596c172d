"""Fused clip-grad-norm: one multi-tensor norm and one multi-tensor scale.

What it finds
-------------
``torch.nn.utils.clip_grad_norm_(params, max_norm)`` as Dynamo traces it. With ``foreach=False``
(or a device without foreach kernels) every gradient gets its own norm and its own scale::

    norm_0 = torch._C._linalg.linalg_vector_norm(g_0, 2.0)      # ... one per gradient
    to_0 = norm_0.to(device(type='cpu'))                         # ... one per gradient
    stack = torch.stack([to_0, to_1, ...])
    total_norm = torch._C._linalg.linalg_vector_norm(stack, 2.0)
    clip_coef_clamped = torch.clamp(1.0 / (total_norm + 1e-06), max=1.0)
    clip_coef_clamped_device = clip_coef_clamped.to(device(type='cpu'))
    mul_ = g_0.mul_(clip_coef_clamped_device)                    # ... one per gradient

The foreach form already calls ``torch._foreach_norm`` / ``torch._foreach_mul_`` but still holds
O(gradients) ``getitem`` and ``.to(device)`` nodes between the norms and ``stack``.

Two independent, documented checks:

- *norm*: ``linalg_vector_norm(stack([n_0.to(d), ...]), ord)`` where each ``n_i`` is
  ``linalg_vector_norm(g_i, ord)`` of a distinct graph input or ``getitem(_foreach_norm(gs, ord), i)``,
  every gradient on device ``d``, with nothing else between the first norm and ``stack``;
- *scale*: a run of consecutive ``g_i.mul_(c)`` on distinct graph inputs with one coefficient
  ``c = clamp(max_norm / (total + 1e-06), max=1.0)`` (optionally ``.to(device)``).

What it changes
---------------
::

    _foreach_norm = torch._foreach_norm([g_0, g_1, ...], 2.0)
    stack = torch.stack(_foreach_norm)
    total_norm = torch._C._linalg.linalg_vector_norm(stack, 2.0)        # kept, still returned
    ...
    _foreach_mul_ = torch._foreach_mul_([g_0, g_1, ...], clip_coef_clamped_device)

What it guarantees
------------------
Only the L2 norm (``ord == 2``) is rewritten; ``inf``, ``1``, ... are left alone with the reason
recorded. ``total_norm`` and the clip coefficient are the same nodes as before, so the returned
norm and any ``error_if_nonfinite`` check on it are unchanged (in torch 2.13 Dynamo graph-breaks on
that check, leaving norm and scale in separate graphs; each part is rewritten on its own). Values
equal the per-tensor ones (``_foreach_norm`` computes the same per-tensor norms; a device kernel
may differ by a few ulps).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, ClassVar

import torch
import torch.fx

from hpuopt.config import Config
from hpuopt.fx_utils import is_leaf, leaf_value
from hpuopt.records import Finding
from hpuopt.passes.base import GraphPass, PassResult, Stage

log = logging.getLogger(__name__)

_VECTOR_NORMS = (torch._C._linalg.linalg_vector_norm, torch.linalg.vector_norm)


@dataclasses.dataclass(frozen=True)
class FusedNorm(Finding):
    """Per-gradient norms replaced by one ``_foreach_norm`` over ``num_grads`` gradients."""

    pass_name: ClassVar[str] = "fused_clip_norm"

    node: str
    num_grads: int
    replaced_nodes: int

    @property
    def reason(self) -> str:
        return f"{self.num_grads} gradient norms became one _foreach_norm"


@dataclasses.dataclass(frozen=True)
class FusedScale(Finding):
    """Per-gradient ``mul_`` by the clip coefficient replaced by one ``_foreach_mul_``."""

    pass_name: ClassVar[str] = "fused_clip_norm"

    node: str
    num_grads: int

    @property
    def reason(self) -> str:
        return f"{self.num_grads} gradient scales became one _foreach_mul_"


@dataclasses.dataclass(frozen=True)
class ClipNormSkipped(Finding):
    """A clip-norm candidate (anchored at ``node``) left unchanged, and why."""

    pass_name: ClassVar[str] = "fused_clip_norm"
    applied: ClassVar[bool] = False

    reason: str
    node: str


@dataclasses.dataclass(frozen=True)
class FusedClipNormPass(GraphPass):
    """Rewrites a traced L2 ``clip_grad_norm_`` into one multi-tensor norm and one scale."""

    name: ClassVar[str] = "fused_clip_norm"
    stage: ClassVar[Stage] = "pre_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        findings: list[Any] = []
        for node in list(gm.graph.nodes):
            if _is_total_norm(node):
                findings.append(_fuse_norms(gm, node))
        for coefficient in [n for n in gm.graph.nodes if _is_clip_coefficient(n)]:
            findings.extend(_fuse_scales(gm, coefficient))
        modified = any(isinstance(f, (FusedNorm, FusedScale)) for f in findings)
        return PassResult(gm, modified, tuple(findings))


def _is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _ord(node: torch.fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2.0)


def _device_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.device | None:
    value = leaf_value(gm, node)
    return value.device if isinstance(value, torch.Tensor) else None


# -- norm ----------------------------------------------------------------------------------------


def _is_total_norm(node: torch.fx.Node) -> bool:
    """``linalg_vector_norm(torch.stack([...]), ord)``: the total norm of clip_grad_norm_."""
    return (
        _is_call(node, *_VECTOR_NORMS)
        and _is_call(node.args[0], torch.stack)
        and isinstance(node.args[0].args[0], (list, tuple))
    )


def _fuse_norms(gm: torch.fx.GraphModule, total: torch.fx.Node) -> FusedNorm | ClipNormSkipped:
    stack = total.args[0]
    ord_ = _ord(total)
    if float(ord_) != 2.0:
        return ClipNormSkipped(reason=f"norm_type {ord_!r} is not the L2 norm", node=total.name)
    grads, chain, foreach = [], [], None
    for item in stack.args[0]:
        if not (isinstance(item, torch.fx.Node) and item.op == "call_method" and item.target == "to"):
            return ClipNormSkipped(reason=f"stacked {item} is not norm.to(device)", node=total.name)
        norm = item.args[0]
        if _is_call(norm, *_VECTOR_NORMS) and is_leaf(norm.args[0]) and float(_ord(norm)) == 2.0:
            grads.append(norm.args[0])
        elif _is_call(norm, operator.getitem) and _is_call(norm.args[0], torch._foreach_norm):
            foreach = foreach or norm.args[0]
            if norm.args[0] is not foreach or norm.args[1] != len(grads):
                return ClipNormSkipped(reason="stacked norms come from several _foreach_norm calls",
                                      node=total.name)  # fmt: skip
            grads.append(foreach.args[0][norm.args[1]])
        else:
            return ClipNormSkipped(reason=f"{norm} is not an L2 norm of a gradient", node=total.name)
        devices = {_device_of(gm, grads[-1]), item.args[1] if len(item.args) > 1 else None}
        if len(devices) != 1 or None in devices:
            return ClipNormSkipped(reason=f"{norm} moves between devices", node=total.name)
        chain += [item, norm]
    if foreach is not None:
        if len(foreach.args[0]) != len(grads) or float(foreach.args[1]) != 2.0:
            return ClipNormSkipped(reason="_foreach_norm is not the L2 norm of exactly the stacked grads",
                                  node=total.name)  # fmt: skip
    if len(set(grads)) != len(grads) or not all(is_leaf(g) for g in grads):
        return ClipNormSkipped(reason="gradients are not distinct graph inputs", node=total.name)
    inside = set(chain) | {stack}
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    position = {n: i for i, n in enumerate(calls)}
    start = min(position[n] for n in chain)
    between = [n for n in calls[start : position[stack]] if n not in inside]
    if between:
        return ClipNormSkipped(reason=f"{between[0].name} runs between the norms", node=total.name)
    if any(u not in inside for n in chain for u in n.users) or (
        foreach is not None and any(u not in inside for u in foreach.users)
    ):
        return ClipNormSkipped(reason="a per-gradient norm is used outside the total norm", node=total.name)
    if foreach is not None:
        fused = foreach  # already one multi-tensor norm: only the per-element nodes go
    else:
        with gm.graph.inserting_before(stack):
            fused = gm.graph.call_function(torch._foreach_norm, (list(grads), 2.0))
    stack.args = (fused, *stack.args[1:])
    for node in sorted(chain, key=position.__getitem__, reverse=True):
        gm.graph.erase_node(node)
    log.debug("fused_clip_norm: %d norms -> %s", len(grads), fused.name)
    return FusedNorm(node=fused.name, num_grads=len(grads), replaced_nodes=len(chain))


# -- scale ---------------------------------------------------------------------------------------


def _is_clip_coefficient(node: torch.fx.Node) -> bool:
    """``clamp(max_norm / (total + 1e-06), max=1.0)``, the coefficient clip_grad_norm_ scales by."""
    if not (_is_call(node, torch.clamp) and node.kwargs.get("max") == 1.0):
        return False
    div = node.args[0]
    return (
        _is_call(div, operator.truediv)
        and isinstance(div.args[0], (int, float))
        and _is_call(div.args[1], operator.add)
        and div.args[1].args[1] == 1e-06
    )


def _fuse_scales(gm: torch.fx.GraphModule, coefficient: torch.fx.Node) -> list[FusedScale | ClipNormSkipped]:
    total = coefficient.args[0].args[1].args[0]
    if _is_total_norm(total) and float(_ord(total)) != 2.0:
        return [ClipNormSkipped(reason=f"norm_type {_ord(total)!r} is not the L2 norm", node=coefficient.name)]
    scales = {coefficient} | {
        u for u in coefficient.users if u.op == "call_method" and u.target == "to" and len(u.users) > 0
    }
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    position = {n: i for i, n in enumerate(calls)}
    results: list[FusedScale | ClipNormSkipped] = []
    for scale in scales:
        muls = [u for u in scale.users if u.op == "call_method" and u.target == "mul_" and u.args[1] is scale]
        if not muls:
            continue
        if len(muls) == 1 or any(not is_leaf(m.args[0]) or m.users for m in muls):
            continue  # a single grad, or not the per-gradient form: nothing to fuse
        positions = sorted(position[m] for m in muls)
        if positions[-1] - positions[0] != len(muls) - 1:
            results.append(ClipNormSkipped(reason="the per-gradient scales are not consecutive", node=scale.name))
            continue
        grads = [calls[p].args[0] for p in positions]
        if len(set(grads)) != len(grads):
            results.append(ClipNormSkipped(reason="a gradient is scaled twice", node=scale.name))
            continue
        with gm.graph.inserting_before(calls[positions[0]]):
            fused = gm.graph.call_function(torch._foreach_mul_, (grads, scale))
        for p in reversed(positions):
            gm.graph.erase_node(calls[p])
        log.debug("fused_clip_norm: %d scales -> %s", len(grads), fused.name)
        results.append(FusedScale(node=fused.name, num_grads=len(grads)))
    return results
