"""Transfer rules of ops that are finite on positive operands (``rsqrt``, ``reciprocal``), and
the positivity proof that lets them keep a finite pad.

``rsqrt(0)`` is infinite, so ``rsqrt`` of a finite pad is not provably finite, and one infinite
pad row becomes NaN in the next product: enough to poison attention over masked pad keys
(0 × NaN is NaN). RMS normalisation, the norm of Llama-style models, computes
``rsqrt(mean(x ** 2) + eps)``: at least ``eps`` (or ``+inf`` where the squares overflow, which
``rsqrt`` maps to 0), pad rows included. The rule proves that form: a non-negative tensor (even powers, ``abs``, ``relu``, means and sums of such, through
casts and views, over NaN-free values) plus a positive constant. When ``eps`` is a graph input (Dynamo passes float
attributes as 0-dim tensors) the proof holds only while it is positive: the plan records the
input as an obligation the runtime checks on every padded call (``PaddingPlan.positive_inputs``).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import node_value, packet_name
from hpuopt.passes.padding.binding import Row, _Op, _Rule
from hpuopt.passes.padding.domain import ANY, FINITE, _Tensor
from hpuopt.passes.padding.rules.pointwise import _pointwise

_PASS = frozenset({"_to_copy", "to", "clone", "alias", "detach", "contiguous", "view",
                   "_unsafe_view", "reshape", "unsqueeze", "squeeze", "expand", "permute",
                   "transpose", "convert_element_type"})
_NONNEG = frozenset({"abs", "relu", "square", "exp", "sigmoid", "softmax", "_softmax"})
_REDUCE = frozenset({"mean", "sum", "amax", "amin"})


def _through(node: Any) -> Any:
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            packet_name(node) in _PASS and node.args:
        node = node.args[0]
    return node


def _not_nan(op: _Op, node: Any) -> bool:
    """The pad of ``node`` holds no NaN: it is finite (or ``node`` is unpadded)."""
    st = op.an.state_of(node)
    return not isinstance(st, _Tensor) or not st.padded or st.pad <= FINITE


def _nonneg(op: _Op, node: Any, depth: int = 0) -> bool:
    """Every value of ``node`` (real and pad) is >= 0 or +inf, never NaN, by construction: even
    powers, ``abs``, ``relu``... of NaN-free values, and sums, means and products of such."""
    node = _through(node)
    if depth > 8 or not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    packet = packet_name(node)
    base = node.args[0] if node.args else None
    if packet in _NONNEG:
        return _not_nan(op, base)
    if packet == "pow" and len(node.args) > 1:
        exp = node.args[1]
        return isinstance(exp, (int, float)) and float(exp).is_integer() and \
            int(exp) % 2 == 0 and _not_nan(op, base)
    if packet == "mul" and len(node.args) > 1 and node.args[0] is node.args[1]:
        return _not_nan(op, base)
    if packet in _REDUCE or packet in ("add", "mul"):
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        return bool(args) and all(_nonneg(op, a, depth + 1) for a in args) and \
            all(not isinstance(a, (int, float)) or a >= 0 for a in node.args[1:2])
    return False


def _positive_scalar(op: _Op, value: Any) -> bool:
    """A constant > 0, or a 0-dim graph input (recorded as an obligation: checked per call)."""
    if isinstance(value, (int, float)):
        return value > 0 and math.isfinite(value)
    node = _through(value)
    if isinstance(node, (int, float)):
        return node > 0 and math.isfinite(node)
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function" and packet_name(node) == "scalar_tensor" and node.args:
        return isinstance(node.args[0], (int, float)) and node.args[0] > 0
    val = node_value(node)
    if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() == 0 \
            and val.dtype.is_floating_point:
        op.an.require_positive(node)
        return True
    return False


def _positive(op: _Op, node: Any) -> bool:
    """``node`` is ``nonneg + positive`` (an RMS norm's ``mean(x ** 2) + eps``)."""
    node = _through(node)
    if not isinstance(node, torch.fx.Node) or packet_name(node) != "add" or len(node.args) < 2:
        return False
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1:
        return False
    return (_nonneg(op, a) and _positive_scalar(op, b)) or \
        (_nonneg(op, b) and _positive_scalar(op, a))


def _top_softmax_sum(op: _Op, node: Any) -> bool:
    """``sum(topk(softmax(z), k, dim).values, dim)`` of NaN-free ``z``: the top values include
    the row's largest probability, at least ``1 / n`` (a router renormalising its top-k
    weights divides by this): positive, pad rows included."""
    node = _through(node)
    if not isinstance(node, torch.fx.Node) or packet_name(node) != "sum" or not node.args:
        return False
    top = _through(node.args[0])
    if not (isinstance(top, torch.fx.Node) and top.target is operator.getitem
            and top.args[1] == 0 and packet_name(top.args[0]) == "topk"):
        return False
    topk = top.args[0]
    probs = _through(topk.args[0])
    if not (isinstance(probs, torch.fx.Node) and packet_name(probs) in ("softmax", "_softmax")):
        return False
    k = topk.args[1] if len(topk.args) > 1 else None
    largest = topk.args[4] if len(topk.args) > 4 else topk.kwargs.get("largest", True)
    return isinstance(k, int) and k >= 1 and largest is not False and \
        _not_nan(op, probs.args[0])


_UNBOUNDED = _pointwise("unary", (ANY, ANY))
_DIVIDE = _pointwise("div")


def _div(op: _Op) -> _Tensor:
    """Division stays finite in the pad when the numerator's pad is finite and the divisor is
    positive by construction (an RMS norm's ``mean(x ** 2) + eps``, or the sum of a softmax's
    top-k values); otherwise the generic rule (a finite nonzero constant keeps the numerator's
    fact; anything else may divide by zero)."""
    result = _DIVIDE(op)
    names = [n for n in op.values if n != "rounding_mode"]
    if result.pad <= FINITE or len(names) < 2 or op.raw("rounding_mode") is not None:
        return result
    num, den = op.raw(names[0]), op.raw(names[1])
    if _not_nan(op, num) and op.an.state_of(num) is not None and \
            (_positive(op, den) or _top_softmax_sum(op, den)):
        return _Tensor(result.dims, FINITE)
    return result


def _finite_on_positive(op: _Op) -> _Tensor:
    """``rsqrt`` and ``reciprocal`` map ``[eps, +inf]`` into ``[0, 1/eps]``: finite."""
    st = op.tensor("self")
    result = _UNBOUNDED(op)
    if st.padded and _positive(op, op.raw("self")):
        return _Tensor(result.dims, FINITE)
    return result


ROWS: tuple[Row, ...] = (
    ("finite on positive operands (rsqrt of an RMS norm)", _Rule(_finite_on_positive), (
        "rsqrt", "reciprocal",
    )),
    ("division (finite over a positive divisor)", _Rule(_div), ("div",)),
)
