"""Boolean-mask assignment of one value becomes ``where``, which a device graph can hold.

What it finds
    ``y[mask] = v`` arrives from AOTAutograd as ``aten.index_put(y, [mask], v)``. With a boolean
    mask the kernel first finds the selected positions (a ``nonzero`` that reads the mask back to
    the host), so the split must keep it out of captured pieces.

What it changes
    When ``mask`` covers the leading dims of ``y`` exactly, ``v`` holds one element of ``y``'s
    dtype and nothing is accumulated, the assignment is the same as a select::

        %index_put = aten.index_put(%y, [%mask], %v)    ->    %where = aten.where.self(%mask, %v, %y)

    (a mask over the leading dims is first viewed with trailing size-1 dims). No host read is
    left, so the piece around it stays captured.

What it guarantees
    Same values, dtype and shape as the assignment; anything else (an index tensor that is not
    a full boolean mask, several values, ``accumulate=True``, dtypes that differ) is left alone
    with the reason recorded. Runs before ``split``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hpuopt.config import Config
from hpuopt.fx_utils import source_line
from hpuopt.passes.base import GraphPass, PassResult
from hpuopt.records import Finding

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class MaskedFillRewrite(Finding):
    pass_name: ClassVar[str] = "masked_fill"
    node: str
    source: str | None
    reason: str = "boolean-mask assignment of one value became a where"


@dataclasses.dataclass(frozen=True)
class MaskedFillSkipped(Finding):
    pass_name: ClassVar[str] = "masked_fill"
    applied: ClassVar[bool] = False
    node: str
    reason: str


@dataclasses.dataclass(frozen=True)
class MaskedFillPass(GraphPass):
    name: ClassVar[str] = "masked_fill"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        findings: list[MaskedFillRewrite | MaskedFillSkipped] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.index_put.default:
                continue
            reason = _why_not(node)
            if reason is not None:
                if reason:  # an empty reason: not a boolean-mask assignment at all
                    findings.append(MaskedFillSkipped(node.name, reason))
                continue
            _rewrite(gm, node)
            findings.append(MaskedFillRewrite(node.name, source_line(node)))
        changed = any(isinstance(f, MaskedFillRewrite) for f in findings)
        return PassResult(gm, changed, tuple(findings))


def _val(arg: object) -> object:
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None


def _why_not(node: torch.fx.Node) -> str | None:
    """None when the rewrite applies; "" when the node is no boolean-mask assignment."""
    self_, indices, values = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if len(indices) != 1 or not isinstance(_val(indices[0]), torch.Tensor):
        return ""
    mask, y, v = _val(indices[0]), _val(self_), _val(values)
    if mask.dtype != torch.bool:
        return ""
    if not isinstance(y, torch.Tensor) or not isinstance(v, torch.Tensor):
        return "no tensor metadata on the assigned tensor or the value"
    if accumulate:
        return "accumulate=True adds to the selected positions"
    if v.dim() > 1 or not all(statically_known_true(d == 1) for d in v.shape):
        return "the value holds more than one element (one per selected position)"
    if v.dtype != y.dtype:
        return f"the value's dtype {v.dtype} differs from the tensor's {y.dtype}"
    if mask.dim() > y.dim() or not all(
        statically_known_true(a == b) for a, b in zip(mask.shape, y.shape)
    ):
        return "the mask does not cover the tensor's leading dims exactly"
    return None


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    self_, indices, values = node.args[:3]
    mask = indices[0]
    y_val, mask_val = _val(self_), _val(mask)
    extra = y_val.dim() - mask_val.dim()
    with gm.graph.inserting_before(node):
        if extra:
            shape = list(mask_val.shape) + [1] * extra
            mask = gm.graph.call_function(aten.view.default, (mask, shape))
            mask.meta["val"] = mask_val.view(shape)
        value = values
        if _val(values).dim() == 1:  # one element in a 1-d tensor: make it a scalar tensor
            value = gm.graph.call_function(aten.squeeze.default, (values,))
            value.meta["val"] = _val(values).squeeze()
        where = gm.graph.call_function(aten.where.self, (mask, value, self_))
    where.meta.update(node.meta)
    node.replace_all_uses_with(where)
    gm.graph.erase_node(node)
