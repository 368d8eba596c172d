"""Transfer rules of normalisations: layer norm and its backward, fused RMS norm, batch norm
(training and eval variants), group norm.

A norm is a row op when its statistics exclude the padded dim; batch norm in training computes
statistics over the batch and is unsafe there. Weight gradients of the backwards sum over the
padded rows: exact with zero pad only. Rule 10 of ``docs/padding.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from hpuopt.passes.padding.binding import Row, RuleFn, _Op, _Rule
from hpuopt.passes.padding.domain import _UNPADDED, ANY, FINITE, ZERO, _Tensor, _Unsafe
from hpuopt.passes.padding.rules.shapes import _broadcast

aten = torch.ops.aten


def _layer_norm(op: _Op) -> tuple[_Tensor, ...]:
    st = op.tensor("input")
    rank = op.rank("input")
    k = len(op.raw("normalized_shape"))
    normed = range(rank - k, rank)
    hit = [st.dim(d).source for d in normed if st.dim(d) is not None]
    if hit:
        raise _Unsafe("layer_norm normalises over the padded dim: its statistics read the pad",
                      hit)
    for name in ("weight", "bias"):
        if op.tensor(name).padded:
            raise _Unsafe(f"layer_norm {name} is padded")
    dims = tuple(st.dim(i) for i in range(rank))
    stats = tuple(st.dim(i) if i < rank - k else None for i in range(rank))
    fin = FINITE if st.pad <= FINITE else ANY
    return _Tensor(dims, fin), _Tensor(stats, fin), _Tensor(stats, fin)


def _layer_norm_backward(op: _Op) -> tuple[_Tensor, ...]:
    g, x = op.tensor("grad_out"), op.tensor("input")
    rank = op.rank("input")
    k = len(op.raw("normalized_shape"))
    if any(g.dim(d) is not None or x.dim(d) is not None for d in range(rank - k, rank)):
        raise _Unsafe("layer_norm backward over the padded dim")
    dims = _broadcast(op, ["grad_out", "input"])
    mask = op.raw("output_mask") or [True, True, True]
    others = max((op.tensor(n).pad for n in ("input", "mean", "rstd") if op.tensor(n).padded),
                 default=FINITE)
    if any(d is not None for d in dims) and (mask[1] or mask[2]):
        if not (g.pad == ZERO and others <= FINITE):
            raise _Unsafe("layer_norm backward sums weight/bias gradients over the padded rows: "
                          "exact only when grad_out's pad is zero")
        op.an.require_zero("layer_norm backward sums weight/bias gradients over the padded rows")
    gin = ZERO if g.pad == ZERO and others <= FINITE else ANY
    return _Tensor(dims, gin), _UNPADDED, _UNPADDED


def _batch_norm(training_arg: str | None, outputs: int) -> RuleFn:
    """``training_arg``: the argument holding the training flag; ``None``: an eval-only op."""

    def rule(op: _Op) -> tuple[_Tensor, ...]:
        st = op.tensor("input")
        rank = op.rank("input")
        training = False if training_arg is None else bool(op.raw(training_arg))
        for name in ("weight", "bias", "running_mean", "running_var"):
            if name in op.values and op.tensor(name).padded:
                raise _Unsafe(f"batch_norm {name} is padded")
        if training:
            hit = [d for d in range(rank) if d != 1 and st.dim(d) is not None]
            if hit:
                raise _Unsafe(f"batch_norm in training computes batch statistics over the padded "
                              f"dim {hit[0]} (and writes them to the running stats)",
                              {st.dim(d).source for d in hit})
        elif st.dim(1) is not None:
            raise _Unsafe("batch_norm with a padded channel dim against unpadded running stats")
        chan = (st.dim(1),) if rank > 1 else (None,)
        main = _Tensor(st.dims, FINITE if st.pad <= FINITE else ANY)
        stats = _Tensor(chan, FINITE)
        return (main,) + (stats,) * (outputs - 1)

    return rule


def _group_norm(op: _Op) -> tuple[_Tensor, ...]:
    st = op.tensor("input")
    rank = op.rank("input")
    hit = [d for d in range(1, rank) if st.dim(d) is not None]
    if hit:
        raise _Unsafe(f"group_norm normalises over the padded dim {hit[0]}")
    fin = FINITE if st.pad <= FINITE else ANY
    return _Tensor(st.dims, fin), _Tensor((st.dim(0), None), fin), _Tensor((st.dim(0), None), fin)


def _rms_norm_fused(op: _Op) -> tuple[_Tensor, ...]:
    st = op.tensor("input")
    rank = op.rank("input")
    k = len(op.raw("normalized_shape"))
    if any(st.dim(d) is not None for d in range(rank - k, rank)):
        raise _Unsafe("rms_norm normalises over the padded dim")
    fin = FINITE if st.pad <= FINITE else ANY
    stats = tuple(st.dim(i) if i < rank - k else None for i in range(rank))
    return _Tensor(st.dims, fin), _Tensor(stats, fin)


ROWS: tuple[Row, ...] = (
    ("layer norm", _Rule(_layer_norm), ("native_layer_norm",)),
    ("layer norm backward", _Rule(_layer_norm_backward), ("native_layer_norm_backward",)),
    ("fused rms norm", _Rule(_rms_norm_fused), ("_fused_rms_norm",)),
    ("batch norm (training flag)", _Rule(_batch_norm("training", 3)), (
        "native_batch_norm", "_native_batch_norm_legit",
    )),
    ("group norm", _Rule(_group_norm), ("native_group_norm",)),
)

OVERLOADS: dict[Any, _Rule] = {
    aten._native_batch_norm_legit_no_training.default: _Rule(_batch_norm(None, 3)),
    aten._native_batch_norm_legit_functional.default: _Rule(_batch_norm("training", 5)),
}
