"""Transfer rule of softmax over a padded dim whose pad is masked: eager attention.

transformers' eager attention computes ``softmax(q @ k^T * scale + mask) @ v`` itself, the
mask additive with ``torch.finfo(dtype).min`` (or ``-inf``) at masked keys. Over a padded key
dim the softmax normaliser reads the pad; it is still exact when every pad key is masked:

- a ``-inf`` fill along the dim (``fills.py``): a pad key's weight is exactly 0 in every row with
  a finite entry; a row whose every key is ``-inf`` is NaN in both runs;
- a finite masking fill (``fills.masking``: ``finfo.min``, at most ``MASKING_BOUND``) in one term
  of ``scores + mask``, ``scores`` a scaled contraction: a pad key's weight underflows to exactly
  0 in every row that keeps some key unmasked, but a *fully masked* row is uniform over all its
  keys, pad keys included, and changes with the bucket. The plan records an ``attends`` check on
  the mask term: every row of it, computed on the call's real inputs, keeps an entry above
  ``MASKING_BOUND / 2``; a call where one does not runs exact.

The result carries ``fills.ROWS_ZERO`` along the dim, which lets the contraction with the values
(``rules/contractions.py``) sum over the pad keys. ``log_softmax`` takes the same proof for its
normaliser; its pad entries (a masked key's log-weight) carry no fact. Rule 11 of
``docs/padding.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import node_value, packet_name
from hpuopt.passes.padding import fills
from hpuopt.passes.padding.binding import Row, RuleFn, _Op, _Rule
from hpuopt.passes.padding.domain import ANY, FINITE, _Tensor, _Unsafe
from hpuopt.passes.padding.rules.reductions import _along_dim

ATTENDS = "attends"
"""The check kind: every row of the node along dim ``bound`` keeps an unmasked entry."""

_VALUE_KEEPING = frozenset({"_to_copy", "clone", "alias", "contiguous", "detach"})
_SHAPE_ONLY = _VALUE_KEEPING | {"view", "_unsafe_view", "reshape", "expand", "unsqueeze",
                                "permute", "transpose"}
_CONTRACTIONS = frozenset({"bmm", "mm", "baddbmm", "matmul"})

def _over_masked_keys(what: str, result: Callable[[_Tensor, int], _Tensor]) -> RuleFn:
    """The rule of ``what`` (softmax, log_softmax) along ``dim``: along another dim rows are
    independent; along a padded dim only with every pad key masked, the plan then requiring
    zero padding; ``result(input state, dim)`` is the output's state then."""
    other_dims = _along_dim(what, pad=FINITE)

    def rule(op: _Op) -> Any:
        st = op.tensor("self")
        rank = op.rank("self")
        d = op.dim_arg("dim", rank)
        if st.dim(d) is None:
            return other_dims(op)
        if fills.fill(st, d) != fills.NEG_INF:  # one finfo.min term: checked per call
            node, dim = _mask_term(op, op.raw("self"), d, rank)
            op.an.require_check(node, ATTENDS, dim)
        op.an.require_zero(f"{what} over the padded dim {d} with masked pad keys")
        return result(st, d)

    return rule


_softmax = _over_masked_keys("softmax", lambda st, d: _Tensor(
    st.dims, FINITE if st.pad <= FINITE else ANY, fills=((d, fills.ROWS_ZERO),)))
"""Masked pad keys weigh exactly 0: the result's pad along the dim is zero rows."""

_log_softmax = _over_masked_keys("log_softmax", lambda st, d: _Tensor(st.dims, ANY))
"""``x - logsumexp(x)``: the normaliser is the real one, so the real entries are exact; the pad
entries are a masked key's log-weight (``-inf`` or hugely negative) and carry no fact."""


def _mask_term(op: _Op, x: Any, d: int, rank: int) -> tuple[torch.fx.Node, int]:
    """The one term of ``x = scores + mask`` whose fill along ``d`` masks; every other term a
    scaled contraction (finite in the pad). Returns the term's node and its own dim for ``d``."""
    source = op.tensor("self").dim(d).source
    masks, others = [], []
    for term in _terms(x):
        if not isinstance(term, torch.fx.Node):
            if isinstance(term, (int, float)) and abs(term) < -fills.MASKING_BOUND:
                continue  # a moderate constant shifts every entry alike
            others.append(term)
            continue
        val = node_value(term)
        own = d - (rank - val.dim()) if isinstance(val, torch.Tensor) else -1
        st = op.an.state_of(term)
        if own >= 0 and fills.masking(fills.fill(st, own)):
            masks.append((term, own))
        else:
            others.append(term)
    if len(masks) != 1:
        raise _Unsafe(f"softmax over the padded dim {d} ({source}) reads the pad region (its "
                      "pad is masked neither by -inf nor by exactly one finfo.min mask term)",
                      {source})
    for term in others:
        st = op.an.state_of(term)
        if not _is_scores(term) or not isinstance(st, _Tensor) or st.padded and st.pad > FINITE:
            raise _Unsafe(f"softmax over the padded dim {d} ({source}) masked by a finfo.min "
                          f"mask: the other term {getattr(term, 'name', term)!r} is not a "
                          "scaled contraction finite in the pad, so a real row may still be "
                          "fully masked", {source})
    return masks[0]


def _terms(x: Any) -> list[Any]:
    """The summands of ``x`` through ``add`` (alpha 1) and value-keeping casts and clones."""
    while isinstance(x, torch.fx.Node) and x.op == "call_function" and \
            packet_name(x) in _VALUE_KEEPING and _float(x):
        x = x.args[0]
    if isinstance(x, torch.fx.Node) and x.target is torch.ops.aten.add.Tensor and \
            x.kwargs.get("alpha", 1) == 1 and len(x.args) == 2:
        return _terms(x.args[0]) + _terms(x.args[1])
    return [x]


def _is_scores(x: Any) -> bool:
    """``q @ k^T`` scaled by constants, through views, expands and casts."""
    while isinstance(x, torch.fx.Node) and x.op == "call_function":
        packet = packet_name(x)
        if packet in _CONTRACTIONS:
            return True
        if packet in ("mul", "div") and len(x.args) == 2 and isinstance(x.args[1], (int, float)):
            x = x.args[0]
        elif packet == "mul" and len(x.args) == 2 and isinstance(x.args[0], (int, float)):
            x = x.args[1]
        elif packet in _SHAPE_ONLY and (packet not in _VALUE_KEEPING or _float(x)):
            x = x.args[0]
        else:
            return False
    return False


def _float(node: torch.fx.Node) -> bool:
    val = node_value(node)
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


ROWS: tuple[Row, ...] = (
    ("softmax: over a padded dim only with masked pad keys", _Rule(_softmax),
     ("_softmax", "softmax")),
    ("log_softmax: over a padded dim only with masked pad keys", _Rule(_log_softmax),
     ("_log_softmax", "log_softmax")),
)
