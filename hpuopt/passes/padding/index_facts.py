"""Index facts: which tensors hold their own positions (``arange`` and what keeps its values).

An index built by ``arange`` and carried through views, expands, ``+ 0`` and integer casts
holds, at every position, the position along one dim (``_Tensor.iota``); so does a shifted
``arange(k, S + k)`` once the shift is taken off again (``- k``). Indexing a tensor with
such indices along each indexed dim is a position-preserving gather: result position ``p``
reads the source at ``p``, so a padded source dim becomes a padded result dim with the same pad
contents. That is how transformers builds its masks (``padding_mask[batch_idx, kv_idx]`` with
``batch_idx`` and ``kv_idx`` from ``arange``), so the fact lets masked pieces be padded.

:func:`propagate` runs after every transfer rule (and on nodes no padded value reaches) and sets
the fact on the result where the op keeps the values; every other op drops it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import node_value
from hpuopt.passes.padding.domain import _UNPADDED, _same, _Sym, _Tensor

aten = torch.ops.aten

_VALUE_KEEPING = frozenset({"clone", "alias", "detach", "contiguous", "lift_fresh_copy",
                            "_to_copy", "to", "_assert_tensor_metadata"})
_RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze",
                       "_reshape_alias", "view_copy", "unsqueeze_copy", "squeeze_copy"})
_CARRIERS = _VALUE_KEEPING | _RESHAPES | {"expand", "slice", "add", "sub", "permute",
                                          "transpose", "arange"}


def carries(node: torch.fx.Node, states: dict[torch.fx.Node, Any]) -> bool:
    """Whether ``node`` may keep an index fact of one of its inputs (or make one: ``arange``)."""
    packet = node.target.overloadpacket.__name__  # type: ignore[union-attr]
    if packet not in _CARRIERS:
        return False
    if packet == "arange":
        return True
    if packet in ("add", "sub") and _cancelled_start(node) is not None:
        return True
    first = node.args[0] if node.args else None
    st = states.get(first) if isinstance(first, torch.fx.Node) else None
    return isinstance(st, _Tensor) and st.iota is not None


def propagate(node: torch.fx.Node, states: dict[torch.fx.Node, Any], result: Any) -> Any:
    """``result`` with the index fact the op keeps from its first operand, or without one."""
    if not isinstance(result, _Tensor):
        return result
    if node.target.overloadpacket.__name__ == "arange":  # type: ignore[union-attr]
        return result if result.iota is not None else result.with_iota(_arange_iota(node))
    if _cancelled_start(node) is not None:  # arange(k, S + k) - k
        return result if result.iota == 0 else result.with_iota(0)
    first = node.args[0] if node.args else None
    st = states.get(first, _UNPADDED) if isinstance(first, torch.fx.Node) else _UNPADDED
    iota = _kept(node, first, st) if isinstance(st, _Tensor) and st.iota is not None else None
    return result if result.iota == iota else result.with_iota(iota)


def _arange_iota(node: torch.fx.Node) -> int | None:
    """0 for ``arange(n)``, ``arange(0, n)`` and ``arange(0, n, 1)``; else no fact."""
    args = list(node.args)
    if node.target is aten.arange.default or len(args) < 2:
        return 0
    start = args[0]
    step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    return 0 if start == 0 and step == 1 else None


def _start_of(node: Any) -> Any:
    """The start of a 1-D ``arange(start, end)`` with step 1 (``None`` for anything else)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and
            node.target in (aten.arange.start, aten.arange.start_step)):
        return None
    step = node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)
    return node.args[0] if step == 1 else None


def _cancelled_start(node: torch.fx.Node) -> Any:
    """``k`` when ``node`` is ``arange(k, end) - k`` or ``arange(k, end) + (-k)`` (a literal
    ``k``, or the same size node for ``sub``): its values are the positions, as ``arange``'s."""
    if node.target not in (aten.add.Tensor, aten.sub.Tensor) or len(node.args) < 2 or \
            node.kwargs.get("alpha", 1) != 1:
        return None
    start, other = _start_of(node.args[0]), node.args[1]
    if start is None or isinstance(start, bool) or isinstance(other, bool):
        return None
    sign = 1 if node.target is aten.sub.Tensor else -1
    if isinstance(start, int) and isinstance(other, int) and start == sign * other:
        return start
    if sign == 1 and isinstance(start, torch.fx.Node) and start is other:
        return start
    return None


def shifted_length(op: Any) -> Any:
    """The padded dim ``arange(k, end)`` runs along when ``end - k`` is exactly a padded extent
    (``arange(1, S + 1)``, ``arange(k, S + k)``) and ``k`` does not depend on the padding: the
    values are ``position + k`` in both runs, so the real region is the real run's. ``None``
    otherwise."""
    start, end = op.raw("start"), op.raw("end")
    start_state = op.an.state_of(start)
    if isinstance(start_state, _Sym) and start_state.deps or \
            not isinstance(end, torch.fx.Node) or isinstance(start, bool):
        return None
    k = start if isinstance(start, int) else node_value(start) if \
        isinstance(start, torch.fx.Node) else None
    if k is None:
        return None
    stack, seen = [end], set()
    while stack:  # the sizes the end is computed from (Python arithmetic on sizes)
        arg = stack.pop()
        if arg in seen:
            continue
        seen.add(arg)
        st = op.an.state_of(arg)
        if isinstance(st, _Sym) and st.exact is not None:
            if _same(node_value(end) - k, node_value(arg)):
                return st.exact
        elif not isinstance(arg.target, torch._ops.OpOverload):
            stack.extend(arg.all_input_nodes)
    return None


def _kept(node: torch.fx.Node, first: torch.fx.Node, st: _Tensor) -> int | None:
    packet = node.target.overloadpacket.__name__  # type: ignore[union-attr]
    out, src = node_value(node), node_value(first)
    if not isinstance(out, torch.Tensor) or not isinstance(src, torch.Tensor):
        return None
    iota = st.iota
    if packet in _VALUE_KEEPING:
        return iota if _holds_positions(src.dtype, out.dtype) and out.dim() == src.dim() \
            else None
    if packet in ("add", "sub"):
        other = node.args[1] if len(node.args) > 1 else None
        alpha = node.kwargs.get("alpha", 1)
        return iota if isinstance(other, int) and other == 0 and alpha == 1 else None
    if packet == "expand":
        return iota + out.dim() - src.dim()
    if packet == "slice":
        dim = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else None
        step = node.args[4] if len(node.args) > 4 else 1
        if dim % src.dim() != iota:
            return iota
        return iota if start in (None, 0) and step == 1 else None
    if packet in ("permute", "transpose") or packet in _RESHAPES:
        mapping = dim_map(packet, node, src, out)
        return mapping.get(iota) if mapping is not None else None
    return None


_WIDTH = {torch.int64: 64, torch.int32: 32, torch.int16: 16, torch.int8: 8, torch.uint8: 8}


def _holds_positions(src: torch.dtype, out: torch.dtype) -> bool:
    """A cast keeps every position's value: integer to an integer type at least as wide (a
    narrowing cast wraps large positions onto small ones; a float one rounds them)."""
    return out in _WIDTH and src in _WIDTH and _WIDTH[out] >= _WIDTH[src] and \
        not (src != torch.uint8 and out == torch.uint8)


def _order(node: torch.fx.Node, rank: int) -> list[int] | None:
    if node.target.overloadpacket.__name__ == "permute":  # type: ignore[union-attr]
        dims = node.args[1]
        return [d % rank for d in dims] if all(isinstance(d, int) for d in dims) else None
    a, b = node.args[1], node.args[2]
    if not (isinstance(a, int) and isinstance(b, int)):
        return None
    order = list(range(rank))
    order[a % rank], order[b % rank] = order[b % rank], order[a % rank]
    return order


def dim_map(packet: str, node: torch.fx.Node, src: torch.Tensor, out: torch.Tensor
            ) -> dict[int, int] | None:
    """Input dim -> output dim of a permute, or of a reshape that only adds or drops size-1
    dims (the others keep their order and extents); ``None`` for any other reshape."""
    if packet in ("permute", "transpose"):
        order = _order(node, src.dim())
        return None if order is None else {i: order.index(i) for i in range(src.dim())}
    big_in = [i for i, n in enumerate(src.shape) if not _same(n, 1)]
    big_out = [j for j, n in enumerate(out.shape) if not _same(n, 1)]
    if len(big_in) != len(big_out) or not all(
            _same(src.shape[i], out.shape[j]) for i, j in zip(big_in, big_out)):
        return None
    return dict(zip(big_in, big_out))
