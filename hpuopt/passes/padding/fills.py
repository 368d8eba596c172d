"""Fill facts: the exact value a tensor holds wherever its index along one padded dim is pad.

The pad-content facts (``ZERO ⊂ FINITE ⊂ ANY``) describe a tensor's whole pad region. A mask
padded along two dims needs more: an attention mask built from a zero-padded key-padding mask
and a causal mask holds ``False`` wherever the *key* index is pad, but real ``True`` values
where only the *query* index is. ``_Tensor.fills`` records such facts per dim, as pairs
``(dim, value)`` with value ``0`` (zero or ``False``), ``1`` (``True``) or ``-inf``, and
:func:`propagate` carries them through the ops masks are built with: comparisons' ``and``/``or``,
``logical_not``, ``where`` and ``masked_fill`` with constant values, casts, views and expands.
The attention rule reads them: a mask whose key dim fills with ``False`` (or a bias with
``-inf``) excludes every pad key, which makes attention over a padded key length exact.

Zero-padded inputs start with a zero fill along every padded dim; a rule that relies on a fill
that came from an input calls ``require_zero``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import node_value, packet_name
from hpuopt.passes.padding.domain import _UNPADDED, FINITE, _same, _Tensor
from hpuopt.passes.padding.index_facts import dim_map

NEG_INF = -math.inf
MASKING_BOUND = -1e4
"""A finite fill at or below this (``torch.finfo(dtype).min`` of every float type) masks a key
in a softmax, but only in rows that keep some key above it: a fully masked row is uniform."""


class _RowsZero:
    def __repr__(self) -> str:
        return "0 (real rows)"


ROWS_ZERO = _RowsZero()
"""A fill value weaker than ``0``: zero wherever the index along the dim is pad *and* every other
padded index is real (a masked softmax's weights: a pad row may be fully masked and weigh the
pad keys too). Kept by views and float casts only; a contraction over the dim reads it."""


def masking(value: Any) -> bool:
    """Whether fill ``value`` is ``-inf`` or a finite constant at or below ``MASKING_BOUND``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        value <= MASKING_BOUND

_AND = frozenset({"bitwise_and", "logical_and", "mul"})
_OR = frozenset({"bitwise_or", "logical_or"})
_NOT = frozenset({"logical_not", "bitwise_not"})
_KEEP = frozenset({"clone", "alias", "detach", "contiguous", "lift_fresh_copy", "_to_copy",
                   "to", "expand", "unsqueeze", "squeeze", "view", "_unsafe_view", "reshape",
                   "permute", "transpose", "slice"})


def fill(state: Any, dim: int) -> Any:
    """The fill value of ``state`` along ``dim``, or ``None``."""
    if isinstance(state, _Tensor):
        for d, v in state.fills:
            if d == dim:
                return v
    return None


def propagate(node: torch.fx.Node, states: dict[torch.fx.Node, Any], result: Any) -> Any:
    """``result`` with the fills the op keeps or makes; ``result.fills`` set by the rule stay."""
    if not isinstance(result, _Tensor) or not result.padded or result.fills:
        return result
    packet = node.target.overloadpacket.__name__  # type: ignore[union-attr]
    out = node_value(node)
    if not isinstance(out, torch.Tensor):
        return result
    fills = _fills(packet, node, states, out)
    fills = tuple((d, v) for d, v in fills if result.dim(d) is not None)
    return _with(result, fills) if fills else result


def _with(state: _Tensor, fills: Sequence[tuple[int, Any]]) -> _Tensor:
    return dataclasses.replace(state, fills=tuple(sorted(dict(fills).items())))


def _operands(node: torch.fx.Node, states: dict[torch.fx.Node, Any], out: torch.Tensor
              ) -> list[tuple[Any, dict[int, Any]]]:
    """Each tensor or scalar operand with its fills mapped to result dims (right-aligned)."""
    found = []
    for a in node.args:
        if isinstance(a, torch.fx.Node):
            val = node_value(a)
            if not isinstance(val, torch.Tensor):
                continue
            st = states.get(a, _UNPADDED)
            lead = out.dim() - val.dim()
            mapped = {d + lead: v for d, v in st.fills} if isinstance(st, _Tensor) else {}
            found.append((st, mapped))
        elif isinstance(a, (bool, int, float)):
            found.append((a, {}))
    return found


def _fills(packet: str, node: torch.fx.Node, states: dict[torch.fx.Node, Any],
           out: torch.Tensor) -> list[tuple[int, Any]]:
    ops = _operands(node, states, out)
    if packet in _AND:
        if packet == "mul" and not all(_finite(st) for st, _ in ops):
            return []  # 0 * inf is not 0
        return [(d, 0) for _, f in ops for d, v in f.items() if v == 0]
    if packet in _OR:
        return [(d, 1) for _, f in ops for d, v in f.items() if v == 1]
    if packet in _NOT and out.dtype == torch.bool and ops:
        return [(d, 1 - v) for d, v in ops[0][1].items() if v in (0, 1)]
    if packet == "where" and ops:
        return _where(node, ops[0][1])
    if packet == "masked_fill" and len(ops) >= 2:
        value = _constant(node.args[2]) if len(node.args) > 2 else None
        return [(d, value) for d, v in ops[1][1].items() if v == 1 and value is not None]
    if packet == "add" and len(ops) == 2:
        return _add(ops)
    if packet in _KEEP and ops:
        return _kept(packet, node, ops[0], out)
    return []


def _where(node: torch.fx.Node, cond: dict[int, Any]) -> list[tuple[int, Any]]:
    a, b = (_constant(x) for x in node.args[1:3])
    picked = {1: a, 0: b}
    return [(d, picked[v]) for d, v in cond.items() if v in picked and picked[v] is not None]


def _add(ops: list[tuple[Any, dict[int, Any]]]) -> list[tuple[int, Any]]:
    """``-inf + finite = -inf`` and ``0 + 0 = 0`` along a dim."""
    (sa, fa), (sb, fb) = ops
    found = []
    for d in set(fa) | set(fb):
        va, vb = fa.get(d), fb.get(d)
        if va == 0 and vb == 0:
            found.append((d, 0))
        elif va == NEG_INF and _finite(sb) or vb == NEG_INF and _finite(sa):
            found.append((d, NEG_INF))
    return found


def _finite(state: Any) -> bool:
    if isinstance(state, (int, float)):
        return math.isfinite(state)
    return isinstance(state, _Tensor) and (not state.padded or state.pad <= FINITE)


def _kept(packet: str, node: torch.fx.Node, first: tuple[Any, dict[int, Any]],
          out: torch.Tensor) -> list[tuple[int, Any]]:
    """Casts keep the value (converted); views and expands move it with its dim."""
    src = node_value(node.args[0])
    fills = first[1]
    if packet in ("_to_copy", "to"):
        return [(d, _cast(v, out.dtype)) for d, v in fills.items() if _cast(v, out.dtype)
                is not None]
    if packet in ("clone", "alias", "detach", "contiguous", "lift_fresh_copy", "slice",
                  "expand"):
        return list(fills.items())  # same rank (expand: right-aligned by _operands)
    mapping = dim_map(packet, node, src, out) or _same_index_dims(packet, src, out)
    if mapping is None:
        return []
    lead = out.dim() - src.dim()  # _operands shifted the dims right by this much
    return [(mapping[d - lead], v) for d, v in fills.items() if (d - lead) in mapping]


def _same_index_dims(packet: str, src: torch.Tensor, out: torch.Tensor) -> dict[int, int] | None:
    """For a reshape that merges or splits other dims (``[B, H, S, S] -> [B*H, S, S]``): the
    input dims kept whole, with the same extent behind the same number of elements, so their
    index is the same in both (a fill along them holds as it was)."""
    if packet not in ("view", "_unsafe_view", "reshape"):
        return None

    def starts(shape: Sequence[Any]) -> list[Any]:
        out, acc = [], 1
        for n in shape:
            out.append(acc)
            acc = acc * n
        return out

    si, so = starts(src.shape), starts(out.shape)
    return {i: j for i in range(src.dim()) for j in range(out.dim())
            if _same(src.shape[i], out.shape[j]) and _same(si[i], so[j])
            and not _same(src.shape[i], 1)} or None


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if value is ROWS_ZERO:
        return value if dtype.is_floating_point else None
    if dtype == torch.bool:
        return 0 if value == 0 else 1
    if value == NEG_INF:
        return NEG_INF if dtype.is_floating_point else None
    return value


def _constant(x: Any) -> Any:
    """A Python number, or the value of a ``scalar_tensor``/``full`` node; else ``None``."""
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, torch.fx.Node) and x.op == "call_function" and x.args:
        packet = packet_name(x)
        value = x.args[0] if packet == "scalar_tensor" else (
            x.args[1] if packet == "full" and len(x.args) > 1 else None)
        if isinstance(value, (int, float, bool)):
            return int(value) if isinstance(value, bool) else value
    return None
