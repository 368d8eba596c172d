"""Transfer rules of ops that read along a dim: reductions, softmax and its backward, order
statistics (``sort``, ``topk``...) and scans (``cumsum``...).

Over a padded dim they read the pad: unsafe, except ``sum``/``any``/norms of a ZERO pad region
(exact with pad value 0) and forward scans, which read earlier positions only. Rules 9 and 11 to
13 of ``docs/padding.md``.
"""

from __future__ import annotations

from typing import Any

from hpuopt.passes.padding.binding import Row, RuleFn, _multi, _Op, _Rule
from hpuopt.passes.padding.domain import ANY, FINITE, ZERO, _Dim, _Tensor, _Unsafe
from hpuopt.passes.padding.rules.shapes import _broadcast


def _reduction(kind: str, dim_arg: str = "dim", zero_exact: bool = False) -> RuleFn:
    """Reductions over ``dim_arg`` (all dims when absent/empty).

    ``kind`` maps the pad-content fact: ``keep`` (sum, mean, amax, prod of zeros are zero),
    ``finite`` (logsumexp), ``index`` (argmax: indices are finite). ``zero_exact``: reducing over
    the padded dim is exact when its pad region is ZERO (sum, any, norms).
    """

    def rule(op: _Op) -> Any:
        st = op.tensor("self")
        rank = op.rank("self")
        dims = op.dims_arg(dim_arg, rank) if dim_arg in op.values else tuple(range(rank))
        exact = zero_exact
        if op.schema.name == "aten::linalg_vector_norm":
            order = op.raw("ord")
            exact = isinstance(order, (int, float)) and order >= 0
        hit = [d for d in dims if st.dim(d) is not None]
        if hit:
            name = op.schema.name.split("::")[-1]
            if not (exact and st.pad == ZERO):
                raise _Unsafe(f"{name} reduces over the padded dim {hit[0]} "
                              f"({st.dim(hit[0]).source}): the result reads the pad region"
                              + (" (exact only with zero padding)" if exact else ""),
                              {st.dim(hit[0]).source})
            op.an.require_zero(f"{name} over the padded dim {hit[0]}")
        keep = bool(op.raw("keepdim"))
        out: list[_Dim | None] = []
        for i in range(rank):
            if i not in dims:
                out.append(st.dim(i))
            elif keep:
                out.append(None)
        pad = {"keep": st.pad, "index": FINITE}.get(kind, FINITE if st.pad <= FINITE else ANY)
        results = [_Tensor(tuple(out), pad if k == 0 else FINITE) for k in range(_multi(op))]
        return results[0] if len(results) == 1 else tuple(results)

    return rule


def _along_dim(what: str, *, scan: bool = False, pad: int | None = None) -> RuleFn:
    """Ops independent along every dim but ``dim`` (softmax, sort, topk, scans).

    Along ``dim`` itself they read every position: unsafe when it is padded, except for a causal
    ``scan`` (rule 13). Results may drop ``dim`` (median, kthvalue) or resize it (topk); indices
    results are finite.
    """

    def rule(op: _Op) -> Any:
        first = op.schema.arguments[0].name
        st = op.tensor(first)
        in_shape = op.shape(first)
        rank = len(in_shape)
        if op.raw("dim") is None:
            dims = tuple(range(rank))
        else:
            dims = (op.dim_arg("dim", rank),)
        hit = [d for d in dims if st.dim(d) is not None]
        if hit and not scan:
            raise _Unsafe(f"{what} over the padded dim {hit[0]} ({st.dim(hit[0]).source}) "
                          "reads the pad region", {st.dim(hit[0]).source})
        fact = st.pad if pad is None else (pad if st.pad <= FINITE else ANY)
        results: list[_Tensor] = []
        for k in range(_multi(op)):
            out_rank = len(op.out_shape(k if _multi(op) > 1 else None))
            if out_rank == rank:
                dims_k = st.dims
            elif out_rank == rank - 1 and len(dims) == 1:
                dims_k = tuple(st.dim(i) for i in range(rank) if i != dims[0])
            else:
                dims_k = None
            results.append(_Tensor(dims_k, fact if k == 0 else FINITE))
        return results[0] if len(results) == 1 else tuple(results)

    return rule


def _softmax_backward(op: _Op) -> _Tensor:
    g, y = op.tensor("grad_output"), op.tensor("output")
    dims = _broadcast(op, ["grad_output", "output"])
    dim = op.dim_arg("dim", len(dims))
    if dims[dim] is not None:
        raise _Unsafe(f"softmax backward over the padded dim {dim} reads the pad region")
    # grad_in = y * (g - sum(g * y)) (or g - exp(y) * sum(g)): zero rows of g give zero rows.
    pad = ZERO if g.pad == ZERO and (y.pad <= FINITE or not y.padded) else ANY
    return _Tensor(dims, pad)


ROWS: tuple[Row, ...] = (
    ("reductions, exact with zero pad", _Rule(_reduction("keep", zero_exact=True)), (
        "sum", "nansum", "any", "linalg_vector_norm",
    )),
    ("reductions", _Rule(_reduction("keep")), (
        "mean", "prod", "all", "amax", "amin", "var", "std", "norm", "var_mean", "std_mean",
        "max", "min", "aminmax",
    )),
    ("reductions to finite values", _Rule(_reduction("finite")), ("logsumexp",)),
    ("index reductions", _Rule(_reduction("index")), ("argmax", "argmin")),
    ("softmax backward", _Rule(_softmax_backward), (
        "_softmax_backward_data", "_log_softmax_backward_data",
    )),
    ("order statistics", _Rule(_along_dim("sort")), (
        "sort", "topk", "kthvalue", "median", "nanmedian", "mode", "argsort", "msort",
    )),
    ("causal scans: safe along the padded dim", _Rule(_along_dim("scan", scan=True, pad=FINITE)), (
        "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin",
    )),
)
