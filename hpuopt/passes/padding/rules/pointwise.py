"""Transfer rules of position-wise ops: elementwise maths, comparisons, casts, activation
backwards, identities, ``tril``/``triu`` masks, and the in-place ``copy_``.

Dims broadcast from the right (:func:`_broadcast`); the pad-content fact of the result follows
what the op does to zeros (``relu(0) = 0`` keeps ``ZERO``, ``exp(0) = 1`` gives ``FINITE``, ``log``
gives ``ANY``). Rule 2 of ``docs/padding.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from hpuopt.passes.padding.binding import Row, RuleFn, _Op, _Rule
from hpuopt.passes.padding.domain import ANY, FINITE, ZERO, _literal_pad, _Tensor, _Unsafe
from hpuopt.passes.padding.rules.shapes import _broadcast

aten = torch.ops.aten


def _padded_at(op: _Op, name: str, st: _Tensor, dims: Sequence[Any]) -> set[int]:
    """The result dims along which operand ``name`` is padded (broadcast from the right)."""
    shape = op.shape(name) if isinstance(op.raw(name), torch.fx.Node) else ()
    lead = len(dims) - len(shape)
    return {j for j in range(lead, len(dims)) if st.dim(j - lead) is not None}


def _covers(op: _Op, name: str, st: _Tensor, dims: Sequence[Any]) -> bool:
    """Whether operand ``name`` is padded along every padded dim of the result: only then is
    each pad position of the result a pad position of the operand. Elsewhere (an operand padded
    along one dim, the result along two) the operand brings real values into the result's pad."""
    return {j for j, d in enumerate(dims) if d is not None} <= _padded_at(op, name, st, dims)


def _zero_product(op: _Op, operands: Sequence[str], dims: Sequence[Any]) -> bool:
    """A product is zero at every pad position when each of them lies in the pad of some
    operand whose pad is zero (the others finite there)."""
    covered: set[int] = set()
    for name in operands:
        st = op.state(name)
        if isinstance(st, _Tensor) and st.padded:
            if st.pad == ZERO:
                covered |= _padded_at(op, name, st, dims)
            elif st.pad > FINITE:
                return False
    return {j for j, d in enumerate(dims) if d is not None} <= covered


def _pw_pad(op: _Op, kind: str, operands: Sequence[str], unary: tuple[int, int],
            dims: Sequence[Any] = ()) -> int:
    facts: list[int] = []
    for name in operands:
        v = op.raw(name)
        st = op.state(name)
        if isinstance(st, _Tensor):
            if st.padded and not _covers(op, name, st, dims):
                facts.append(max(st.pad, FINITE))  # real (finite) values reach the pad too
                continue
            facts.append(st.pad if st.padded else FINITE)
        elif isinstance(v, (list, tuple)):
            continue
        elif v is None or isinstance(v, (torch.dtype, torch.device, torch.layout, str)):
            continue
        else:
            facts.append(_literal_pad(v) if not isinstance(v, torch.fx.Node) else FINITE)
    if not facts:
        return ANY
    worst = max(facts)
    if kind == "unary":
        tensors = [op.state(n) for n in operands if isinstance(op.state(n), _Tensor)]
        worst = max((t.pad if t.padded else FINITE for t in tensors), default=ANY)
        return (unary[0], unary[1], ANY)[worst]
    if kind == "grad":  # backward of an activation: zero where the incoming gradient is zero
        if facts[0] == ZERO and worst <= FINITE:
            return ZERO
        return FINITE if worst <= FINITE else ANY
    if kind == "add":
        return worst
    if kind == "mul":
        if worst <= FINITE and (ZERO in facts or _zero_product(op, operands, dims)):
            return ZERO
        return FINITE if worst <= FINITE else ANY
    if kind == "div":
        num = facts[0]
        den = op.raw(operands[1]) if len(operands) > 1 else None
        if isinstance(den, (int, float)) and den != 0 and math.isfinite(den):
            return num
        return ANY
    if kind == "bool":
        return FINITE
    return ANY


def _pointwise(kind: str = "any", unary: tuple[int, int] = (ANY, ANY),
               skip: tuple[str, ...] = ("alpha",)) -> RuleFn:
    def rule(op: _Op) -> _Tensor:
        operands = [
            a.name for a in op.schema.arguments
            if a.name not in skip and a.name != "out" and not _is_meta_arg(a)
        ]
        dims = _broadcast(op, operands)
        value_ops = [n for n in operands if n not in ("condition", "mask")]
        return _Tensor(dims, _pw_pad(op, kind, value_ops, unary, dims))

    return rule


def _is_meta_arg(arg: Any) -> bool:
    t = str(arg.type)
    return any(k in t for k in ("ScalarType", "Layout", "Device", "MemoryFormat", "bool", "str",
                                "Generator"))


def _identity(op: _Op) -> _Tensor:
    st = op.tensor("self")
    return _Tensor(st.dims, st.pad)


def _tri(op: _Op) -> _Tensor:
    st = op.tensor("self")  # the mask depends on (row - col) only, not on extents: position-wise
    return _Tensor(st.dims, st.pad)


def _copy(op: _Op) -> _Tensor:
    """``copy_`` (the engine's rule for it): the destination must carry the padded dims."""
    dst, src = op.tensor("self"), op.tensor("src")
    dims = _broadcast(op, ["self", "src"])
    for j, d in enumerate(dims):
        if d is not None and dst.dim(j) is None:
            raise _Unsafe("copies a padded tensor into an unpadded destination")
    return _Tensor(dims, src.pad if src.padded else FINITE)


_Z, _F, _A = ZERO, FINITE, ANY

ROWS: tuple[Row, ...] = (
    # family                            rule                                   ops
    ("pointwise, f(0)=0, finite→finite", _Rule(_pointwise("unary", (_Z, _F))), (
        "neg", "abs", "relu", "gelu", "silu", "tanh", "sin", "sign", "sgn", "hardtanh",
        "leaky_relu", "elu", "selu", "celu", "mish", "hardswish", "floor", "ceil", "round",
        "trunc", "erf", "atan", "asinh", "positive", "frac", "deg2rad", "rad2deg", "clone",
        "_to_copy", "alias", "detach", "lift_fresh_copy", "_conj", "nan_to_num", "asin", "arctan",
    )),
    ("pointwise, f(0)=0, may overflow", _Rule(_pointwise("unary", (_Z, _A))), (
        "sqrt", "expm1", "sinh", "tan", "log1p", "square", "atanh",
    )),
    ("pointwise, f(0) finite ≠ 0", _Rule(_pointwise("unary", (_F, _F))), (
        "sigmoid", "cos", "hardsigmoid", "softplus", "logical_not", "bitwise_not", "isnan",
        "isinf", "isfinite", "signbit",
    )),
    ("pointwise, exp-like", _Rule(_pointwise("unary", (_F, _A))), ("exp", "exp2", "cosh")),
    ("pointwise, unbounded at 0", _Rule(_pointwise("unary", (_A, _A))), (
        "log", "log2", "log10", "lgamma", "digamma", "acos", "acosh",
        "erfinv", "logit",
    )),
    ("pointwise, additive", _Rule(_pointwise("add")), (
        "add", "sub", "rsub", "maximum", "minimum", "fmax", "fmin", "where", "masked_fill",
        "clamp", "clamp_min", "clamp_max", "copy", "lerp",
    )),
    ("pointwise, multiplicative", _Rule(_pointwise("mul")), ("mul", "logical_and", "bitwise_and")),
    ("activation backward: zero where grad is", _Rule(_pointwise("grad")), (
        "threshold_backward", "gelu_backward", "silu_backward", "tanh_backward",
        "sigmoid_backward", "hardtanh_backward", "leaky_relu_backward",
    )),
    ("pointwise, boolean", _Rule(_pointwise("bool")), (
        "eq", "ne", "lt", "le", "gt", "ge", "logical_or", "logical_xor", "bitwise_or",
        "bitwise_xor",
    )),
    ("position masks (tril/triu)", _Rule(_tri), ("tril", "triu")),
    ("identity", _Rule(_identity), ("contiguous", "_assert_tensor_metadata")),
)

OVERLOADS: dict[Any, _Rule] = {
    aten.max.other: _Rule(_pointwise("add")),  # the packets max/min are reductions
    aten.min.other: _Rule(_pointwise("add")),
}
