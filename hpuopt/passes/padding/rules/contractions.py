"""Transfer rules of contractions: ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``mv``, ``dot``.

Row and batch dims carry over; contracting over a padded dim is exact only when one operand's pad
region is ZERO (or it is 0 over the pad in every real row: a fill fact of 0 along the dim) and
the other's FINITE, and then the plan requires pad value 0. Rule 7 of
``docs/padding.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

from hpuopt.passes.padding import fills
from hpuopt.passes.padding.binding import Row, RuleFn, _Op, _Renamed, _Rule
from hpuopt.passes.padding.domain import ANY, FINITE, ZERO, _Dim, _same, _same_dim, _Tensor, _Unsafe


def _contract(op: _Op, a: str, b: str, a_k: int, b_k: int,
              out: Sequence[tuple[str, int] | tuple[str, int, str, int]]) -> _Tensor:
    """Generic matmul: ``a``'s dim ``a_k`` contracts with ``b``'s ``b_k``; ``out`` lists dims."""
    sa, sb = op.tensor(a), op.tensor(b)
    ka, kb = sa.dim(a_k), sb.dim(b_k)
    if ka is not None or kb is not None:
        if ka is None or kb is None or not _same_dim(ka, kb):
            raise _Unsafe("contraction over a padded dim of one operand only")
        pa, pb = sa.pad, sb.pad
        # an operand exactly 0 over the pad in every real row (a masked softmax's weights,
        # fills.ROWS_ZERO) times finite pad rows of the other adds exactly 0 to real outputs
        za, zb = (fills.fill(s, k) in (0, fills.ROWS_ZERO) for s, k in ((sa, a_k), (sb, b_k)))
        if not ((pa == ZERO or za) and pb <= FINITE or (pb == ZERO or zb) and pa <= FINITE):
            raise _Unsafe(f"contracts over the padded {ka.source}: pad × pad products are summed "
                          "into every real output (exact only with zero padding of an operand "
                          "whose pad stays zero)", {ka.source, kb.source})
        op.an.require_zero(f"contraction over the padded {ka.source}")
        op.an.tie_dims(ka, kb)
    dims: list[_Dim | None] = []
    for entry in out:
        ds = [op.tensor(entry[k]).dim(entry[k + 1]) for k in range(0, len(entry), 2)]  # type: ignore[arg-type]
        present = [d for d in ds if d is not None]
        if len(present) == 2 and not _same_dim(present[0], present[1]):
            raise _Unsafe("batch dims of a matmul carry the padded extent differently")
        if len(present) == 2:
            op.an.tie_dims(present[0], present[1])
        if len(present) == 1 and len(ds) == 2:
            raise _Unsafe("batch dim of a matmul is padded in one operand only")
        dims.append(present[0] if present else None)
    # The output's pad region is made of the padded operands' pad rows/columns times finite data.
    padded_facts = [s.pad for s in (sa, sb) if s.padded]
    worst = max(padded_facts, default=FINITE)
    pad = ZERO if padded_facts and worst == ZERO else (FINITE if worst <= FINITE else ANY)
    return _Tensor(tuple(dims), pad)


def _mm(op: _Op) -> _Tensor:
    return _contract(op, "self", "mat2", 1, 0, [("self", 0), ("mat2", 1)])


def _bmm(op: _Op) -> _Tensor:
    return _contract(op, "self", "mat2", 2, 1, [("self", 0, "mat2", 0), ("self", 1), ("mat2", 2)])


def _mv(op: _Op) -> _Tensor:
    return _contract(op, "self", "vec", 1, 0, [("self", 0)])


def _dot(op: _Op) -> _Tensor:
    other = "tensor" if "tensor" in op.values else "other"
    return _contract(op, "self", other, 0, 0, [])


def _with_bias(inner: RuleFn, a: str, b: str) -> RuleFn:
    """``addmm``/``baddbmm``: ``beta·self + alpha·(a @ b)``, the bias broadcast onto the product."""

    def rule(op: _Op) -> _Tensor:
        prod_state = inner(_Renamed(op, {"self": a, "mat2": b}))
        out_shape = op.out_shape()
        bias, bias_shape = op.tensor("self"), op.shape("self")
        dims = list(prod_state.dims or (None,) * len(out_shape))
        for i in range(len(bias_shape)):
            j = len(out_shape) - len(bias_shape) + i
            bd = bias.dim(i)
            if bd is None and dims[j] is not None and not _same(bias_shape[i], 1):
                raise _Unsafe(f"bias dim {i} is unpadded where the product is padded")
            if bd is not None:
                if dims[j] is None:
                    raise _Unsafe(f"padded bias dim {i} meets an unpadded product dim")
                if not _same_dim(bd, dims[j]):  # type: ignore[arg-type]
                    raise _Unsafe("bias and product carry the padded extent differently")
        fb = bias.pad if bias.padded else FINITE
        pad = ZERO if prod_state.pad == ZERO and fb == ZERO else max(prod_state.pad, fb, FINITE)
        return _Tensor(tuple(dims), pad)

    return rule


ROWS: tuple[Row, ...] = (
    ("matmul: rows/batch carry, contraction needs zero pad", _Rule(_mm), ("mm",)),
    ("bmm", _Rule(_bmm), ("bmm",)),
    ("addmm", _Rule(_with_bias(_mm, "mat1", "mat2")), ("addmm",)),
    ("baddbmm", _Rule(_with_bias(_bmm, "batch1", "batch2")), ("baddbmm",)),
    ("mv", _Rule(_mv), ("mv",)),
    ("dot", _Rule(_dot), ("dot", "vdot")),
)
