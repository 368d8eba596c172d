"""Transfer rules of windowed ops and attention: convolution and its backward, pooling and
upsampling, scaled dot-product attention.

Batch (and, for pooling, channel) dims are independent; a padded spatial dim is read by its
neighbours' windows. Attention is safe on batch, head and query dims, and on the key length only
for causal self-attention padded on both lengths. Rules 14 and 15 of ``docs/padding.md``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import node_value
from hpuopt.passes.padding import fills
from hpuopt.passes.padding.binding import Row, RuleFn, _Op, _Rule
from hpuopt.passes.padding.domain import (
    _UNPADDED,
    ANY,
    FINITE,
    ZERO,
    _same,
    _same_dim,
    _Tensor,
    _Unsafe,
)
from hpuopt.passes.padding.rules.masked_softmax import ATTENDS


def _batch_only(arg: str, independent: int, outputs: int = 1) -> RuleFn:
    """Ops independent over the first ``independent`` dims (batch, channels) and windowed after."""

    def rule(op: _Op) -> Any:
        st = op.tensor(arg)
        rank = op.rank(arg)
        hit = [d for d in range(independent, rank) if st.dim(d) is not None]
        if hit:
            raise _Unsafe(f"{op.schema.name.split('::')[-1]} reads neighbours along the padded dim "
                          f"{hit[0]}")
        for name, v in op.values.items():
            if name != arg and isinstance(s := op.state(name), _Tensor) and s.padded:
                raise _Unsafe(f"{name} is padded")
        out_rank = len(op.out_shape(0 if outputs > 1 else None))
        dims = tuple(st.dim(i) if i < independent else None for i in range(out_rank))
        bias = op.raw("bias") if "bias" in op.values else None
        pad = st.pad if (st.pad == ZERO and bias is None) else max(st.pad, FINITE)
        state = _Tensor(dims, pad)
        return state if outputs == 1 else tuple(_Tensor(dims, FINITE if k else pad)
                                                for k in range(outputs))

    return rule


def _conv_backward(op: _Op) -> tuple[_Tensor, ...]:
    g, x = op.tensor("grad_output"), op.tensor("input")
    for name, st in (("grad_output", g), ("input", x)):
        hit = [d for d in range(1, op.rank(name)) if st.dim(d) is not None]
        if hit:
            raise _Unsafe(f"convolution backward with {name} padded on dim {hit[0]}")
    if op.tensor("weight").padded:
        raise _Unsafe("convolution weight is padded")
    mask = op.raw("output_mask") or [True, True, True]
    if (g.padded or x.padded) and (mask[1] or mask[2]):
        if not (g.pad == ZERO and (x.pad <= FINITE or not x.padded)):
            raise _Unsafe("convolution backward sums weight/bias gradients over the padded batch: "
                          "exact only when grad_output's pad is zero")
        op.an.require_zero("convolution backward sums weight/bias gradients over the padded batch")
    gin_dims = (g.dim(0),) + (None,) * (op.rank("input") - 1)
    return _Tensor(gin_dims, ZERO if g.pad == ZERO else ANY), _UNPADDED, _UNPADDED


def _masks_pad_keys(op: _Op, name: str, q: _Tensor, k: _Tensor, v: _Tensor) -> bool:
    """Whether the padded mask or bias ``name`` excludes every pad key: ``False`` (a boolean
    mask) or ``-inf`` (an additive bias) wherever the key index is pad (its fill fact), with the
    key dim laid out like the keys' and every other padded dim matching the query's or the
    operands' lead dims. Masked keys get weight exactly 0, so their values must be finite
    (0 × NaN is NaN): the keys' and values' pad must be finite."""
    mask, shape = op.tensor(name), op.shape(name)
    rank = len(shape)
    if rank == 0:
        return False
    _check_mask_lead_dims(op, name, mask, rank, q)
    key = mask.dim(rank - 1)
    if key is None and k.dim(2) is None and v.dim(2) is None:
        return False  # padded along the batch or query only: no pad key to exclude
    boolean = node_value(op.raw(name)).dtype == torch.bool
    value = fills.fill(mask, rank - 1)
    keys = {x for d in (key, k.dim(2), v.dim(2)) if d is not None for x in d.sources}
    masks = value == 0 if boolean else fills.masking(value)  # False; or -inf, finfo.min...
    if value is None or key is None or not masks:
        if not boolean and value == 0 and op.an.want_mask_fill(op.raw(name)):
            raise _Unsafe(f"attention {name} is an additive mask input: its pad must hold -inf",
                          keys)
        raise _Unsafe(f"attention {name} is padded but does not mask every pad key", keys)
    kl, vl = k.dim(2), v.dim(2)
    if kl is None or vl is None or not (_same_dim(kl, key) and _same_dim(vl, key)):
        raise _Unsafe(f"attention {name} masks a padded key dim the keys do not carry", keys)
    for t, what in ((k, "keys"), (v, "values")):
        if t.padded and t.pad > FINITE:
            raise _Unsafe(f"attention over masked pad keys needs {what} that are provably "
                          "finite in the pad (0 x NaN is NaN)", keys)
    op.an.tie_dims(kl, key)
    op.an.require_zero(f"attention masks the pad keys through {name}")
    if not boolean and value != fills.NEG_INF:
        # a finfo.min bias: the zero pad keys score 0, their weight underflows to exactly 0
        # in every row that keeps a key unmasked; a fully masked row is uniform over all its
        # keys, so each padded call checks that none is (as for eager attention's softmax)
        op.an.require_check(op.raw(name), ATTENDS, rank - 1)
    return True


def _unpadded_mask_dims_broadcast(op: _Op, name: str, q: _Tensor, k: _Tensor) -> None:
    """A mask dim the padding does not reach must broadcast (extent 1) where the operands it
    lines up with are padded: a real-sized mask cannot meet a padded batch or length."""
    mask, shape = op.tensor(name), op.shape(name)
    rank = len(shape)
    for j in range(rank):
        a = j + 4 - rank  # position in (batch, heads, query, key)
        ref = k.dim(2) if a == 3 else (q.dim(a) if a >= 0 else None)
        if ref is not None and mask.dim(j) is None and not _same(shape[j], 1):
            raise _Unsafe(f"attention {name} dim {j} keeps its real extent where the operands "
                          "are padded", set(ref.sources))


def _check_mask_lead_dims(op: _Op, name: str, mask: _Tensor, rank: int, q: _Tensor) -> None:
    """The mask's batch, head and query dims are padded as the query's (or not at all)."""
    for j in range(rank - 1):
        own, ref = mask.dim(j), q.dim(j + 4 - rank) if j + 4 - rank >= 0 else None
        if own is not None and (ref is None or not _same_dim(own, ref)):
            raise _Unsafe(f"attention {name} dim {j} carries a padded extent the query does not")
        if own is not None and ref is not None:
            op.an.tie_dims(own, ref)


def _causal_pad_keys_finite(op: _Op, k: _Tensor, v: _Tensor, keys: set[Any]) -> None:
    """Causal self-attention padded on both lengths gives every pad key weight exactly 0 in a
    real query's row, but the kernels still multiply that weight by the pad values (a fused
    kernel's ``P @ V`` over the whole block): 0 x NaN is NaN. So the keys and values must be
    finite in the pad, which holds only when the runtime pads with zeros."""
    for t, what in ((k, "keys"), (v, "values")):
        if t.padded and t.pad > FINITE:
            raise _Unsafe(f"causal attention over a padded key length needs {what} that are "
                          "provably finite in the pad (0 x NaN is NaN)", keys)
    op.an.require_zero("causal attention multiplies the pad keys' zero weights by their values")


def _attention(op: _Op) -> Any:
    q, k, v = op.tensor("query"), op.tensor("key"), op.tensor("value")
    masked = False
    for name in ("attn_mask", "attn_bias"):
        if name not in op.values or not isinstance(op.raw(name), torch.fx.Node):
            continue
        _unpadded_mask_dims_broadcast(op, name, q, k)
        if op.tensor(name).padded:
            masked = _masks_pad_keys(op, name, q, k, v) or masked
    if (op.raw("dropout_p") or 0.0) > 0.0:
        raise _Unsafe("attention dropout is random (see rule 17)")
    heads = [t.dim(3) for t in (q, k) if t.dim(3) is not None]
    if heads:
        raise _Unsafe("attention contracts over the padded head dim",
                      {x for d in heads for x in d.sources})
    kl, vl = k.dim(2), v.dim(2)
    causal_ok = False
    if kl is not None or vl is not None:
        ql = q.dim(2)
        causal = bool(op.raw("is_causal"))
        ok = masked or (kl is not None and vl is not None and ql is not None and causal
                        and _same_dim(kl, ql) and _same_dim(vl, ql)
                        and _same(op.shape("query")[2], op.shape("key")[2]))
        if not ok:
            raise _Unsafe("attention over a padded key length: the softmax normaliser reads the "
                          "pad (safe only for causal self-attention padded on both lengths)",
                          {x for d in (kl, vl) if d is not None for x in d.sources})
        if kl is None or vl is None or not _same_dim(kl, vl):
            raise _Unsafe("attention keys and values carry the key length differently",
                          {x for d in (kl, vl) if d is not None for x in d.sources})
        op.an.tie_dims(kl, vl)
        if causal and ql is not None:
            op.an.tie_dims(kl, ql)
        if not masked:
            _causal_pad_keys_finite(op, k, v, {x for d in (kl, vl) for x in d.sources})
            causal_ok = True
    lead = []
    for d in (0, 1):
        ds = [t.dim(d) for t in (q, k, v)]
        present = [x for x in ds if x is not None]
        if present and (len(present) != 3 or not all(_same_dim(present[0], x) for x in present)):
            raise _Unsafe(f"attention operands carry the padded extent differently on dim {d}",
                          {x for p in present for x in p.sources})
        for x in present[1:]:
            op.an.tie_dims(present[0], x)
        lead.append(present[0] if present else None)
    # Fully masked rows (a pad batch row, say) give zeros, not NaN, in torch's attention since
    # 2.5 (transformers relies on it as well), so finite operands give a finite output.
    # Causal rows always keep their diagonal key, and an unpadded key length has only real
    # keys: with finite operands those outputs are finite too.
    finite = (masked or causal_ok or (kl is None and vl is None)) and \
        all(t.pad <= FINITE for t in (q, k, v) if t.padded)
    out0 = _Tensor((lead[0], lead[1], q.dim(2), v.dim(3)), FINITE if finite else ANY)
    val = node_value(op.node)
    if not isinstance(val, (list, tuple)):
        return out0
    return (out0,) + tuple(_per_query_output(op, k, item, lead, q)
                           for k, item in enumerate(val) if k)


def _per_query_output(op: _Op, k: int, item: Any, lead: list[Any], q: _Tensor) -> _Tensor:
    """Result ``k`` past the first: a per-query statistic such as the logsumexp ``[B, H, L]``
    carries the batch, head and query dims of the query; anything else is unpadded. The
    memory-efficient kernel rounds the logsumexp's query dim up to a multiple of 32 (and makes
    it 0 when it is not needed): a rounded extent keeps every real query at its position, but
    it is a function of the padded length, so no slice cuts it back. Unread, it is harmless;
    read, it is unsafe for the query length."""
    q_shape = op.shape("query")
    if not isinstance(item, torch.Tensor) or item.dim() < 3 or \
            not all(_same(item.shape[i], q_shape[i]) for i in range(2)):
        return _UNPADDED
    rest = (None,) * (item.dim() - 3)
    if _same(item.shape[2], q_shape[2]):
        return _Tensor((lead[0], lead[1], q.dim(2)) + rest, ANY)
    ql = q.dim(2)
    if ql is not None and not isinstance(item.shape[2], int) and _is_read(op.node, k):
        raise _Unsafe(f"attention result {k} has a query dim of extent {item.shape[2]}, rounded "
                      "up from the padded query length: it cannot be cut back to the real one",
                      set(ql.sources))
    return _Tensor((lead[0], lead[1], None) + rest, ANY)


def _is_read(node: torch.fx.Node, k: int) -> bool:
    """Whether result ``k`` of a multi-result node reaches any op (through ``getitem``)."""
    return any(u.target is operator.getitem and u.args[1] == k and len(u.users) > 0
               for u in node.users)


ROWS: tuple[Row, ...] = (
    ("convolution over the batch dim", _Rule(_batch_only("input", 1)), ("convolution",
                                                                        "_convolution")),
    ("convolution backward", _Rule(_conv_backward), ("convolution_backward",)),
    ("pooling over batch/channels", _Rule(_batch_only("self", 2)), (
        "avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool2d", "avg_pool1d",
        "avg_pool3d", "upsample_nearest2d", "upsample_bilinear2d",
    )),
    ("max pooling (values, indices)", _Rule(_batch_only("self", 2, outputs=2)), (
        "max_pool2d_with_indices", "max_pool3d_with_indices",
    )),
    ("attention", _Rule(_attention), (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    )),
)
