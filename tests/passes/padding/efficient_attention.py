"""CUDA's memory-efficient attention as ATen's ``scaled_dot_product_attention`` traces it, on the
CPU, for the padding analysis tests.

On CUDA, attention with a mask picks the memory-efficient kernel; the composite then turns a
boolean mask into an additive one (``where(mask, 0, -inf)``), expands it to ``[B, H, L, S]``,
pads its last dim up to a multiple of 16 with ``16 - S % 16`` constants and slices the first
``S`` back (ATen's ``preprocess_mask``/``pad_bias``: only the storage gets aligned), and calls
``_scaled_dot_product_efficient_attention``, whose logsumexp result has its query dim rounded
up to a multiple of 32 (0 when not needed). The composite's kernel choice cannot be forced
without a GPU, so :func:`efficient_sdpa` makes the same calls in Python: traced on fake CUDA
tensors (:func:`trace_on`) it gives the graph AOTAutograd gives on a GPU. :func:`cpu_kernel`
registers a CPU kernel for the efficient op (plain attention, zeros for a fully masked row, as
torch's kernels give) so those graphs also run here, padded and unpadded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

aten = torch.ops.aten

ALIGN = 16  # the bias alignment of the memory-efficient kernel
LSE_BLOCK = 32  # its logsumexp's query dim is a multiple of this


def efficient_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, lse: bool = False) -> Any:
    """``F.scaled_dot_product_attention`` as the CUDA composite runs it with the efficient
    kernel; ``lse=True`` also returns the logsumexp (computed when gradients are needed)."""
    if enable_gqa and key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(rep, dim=1) for t in (key, value))
    bias = attn_mask
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.where(bias, 0.0, torch.scalar_tensor(-math.inf, dtype=query.dtype,
                                                              device=query.device))
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        length = bias.shape[-1]
        if length % ALIGN != 0:
            bias = aten.slice.Tensor(aten.constant_pad_nd(bias, [0, ALIGN - length % ALIGN]),
                                     -1, 0, length)
    out = aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, lse or query.requires_grad, dropout_p, is_causal, scale=scale)
    return (out[0], out[1]) if lse else out[0]


def _kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attn_bias: torch.Tensor | None, compute_log_sumexp: bool, dropout_p: float = 0.0,
            is_causal: bool = False, *, scale: float | None = None) -> tuple[torch.Tensor, ...]:
    scores = query @ key.transpose(-2, -1) * (scale or 1 / math.sqrt(query.shape[-1]))
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, -math.inf)
    if attn_bias is not None:
        scores = scores + attn_bias
    out = aten._safe_softmax(scores, -1) @ value
    b, h, length = query.shape[:3]
    lse = torch.zeros(b, h, math.ceil(length / LSE_BLOCK) * LSE_BLOCK if compute_log_sumexp
                      else 0, dtype=torch.float32)
    if compute_log_sumexp:
        lse[..., :length] = torch.logsumexp(scores, -1).float()
    seed = torch.zeros((), dtype=torch.int64)
    return out, lse, seed, seed.clone()


_LIBRARY: list[Any] = []


def cpu_kernel() -> None:
    """Registers :func:`_kernel` as the CPU kernel of the efficient op (once per process)."""
    if not _LIBRARY:
        lib = torch.library.Library("aten", "IMPL")
        lib.impl("_scaled_dot_product_efficient_attention", _kernel, "CPU")
        _LIBRARY.append(lib)


def trace_on(device: str, fn: Callable[..., Any], inputs: Sequence[Any],
             dynamic: Mapping[int, Sequence[int]]) -> torch.fx.GraphModule:
    """``make_fx`` of ``fn`` with exactly the dims ``dynamic`` names symbolic, on fake tensors of
    ``device`` (``"cuda"`` works without a GPU: only the metadata says CUDA)."""
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = []
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            fakes.append(t)
            continue
        dims = [DimDynamic.DYNAMIC if d in dynamic.get(i, ()) else DimDynamic.STATIC
                for d in range(t.dim())]
        f = fake_mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
        with fake_mode:
            fakes.append(torch.empty_strided(f.shape, f.stride(), dtype=t.dtype, device=device))
    with fake_mode, enable_python_dispatcher():
        return make_fx(fn, tracing_mode="real")(*fakes)
