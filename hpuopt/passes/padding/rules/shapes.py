"""Shape helpers more than one rule family uses: the dims of a broadcast, and the dim state a size
argument stands for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx

from hpuopt.passes.padding.binding import _Op
from hpuopt.passes.padding.domain import _Dim, _same, _same_dim, _Sym, _Tensor, _Unsafe


def _broadcast(op: _Op, operands: Sequence[str]) -> tuple[_Dim | None, ...]:
    """Output dims of a broadcasting op; checks that padded dims only meet padded or size-1 dims."""
    out_shape = op.out_shape()
    rank = len(out_shape)
    dims: list[_Dim | None] = [None] * rank
    unpadded_extent: list[list[tuple[str, Any]]] = [[] for _ in range(rank)]
    for name in operands:
        st = op.state(name)
        if not isinstance(st, _Tensor):
            continue
        shape = op.shape(name) if isinstance(op.raw(name), torch.fx.Node) else ()
        r = len(shape)
        for i in range(r):
            j = rank - r + i
            d = st.dim(i)
            if d is None:
                unpadded_extent[j].append((name, shape[i]))
                continue
            cur = dims[j]
            if cur is None:
                dims[j] = d
            elif not _same_dim(cur, d):
                raise _Unsafe(f"dim {j}: operands carry the padded extent with different layouts")
            else:
                op.an.tie_dims(cur, d)
    for j, d in enumerate(dims):
        if d is None:
            continue
        for name, extent in unpadded_extent[j]:
            if not _same(extent, 1):
                raise _Unsafe(
                    f"padded {d.source} meets unpadded dim {j} of operand {name!r} "
                    "(an input of the same extent that is not padded)", {d.source}
                )
    return tuple(dims)


def _size_arg_dim(op: _Op, value: Any, what: str) -> _Dim | None:
    """The state of a dim whose extent is the size argument ``value``."""
    st = op.an.state_of(value)
    if isinstance(st, _Sym) and st.deps:
        if st.exact is None:
            raise _Unsafe(f"{what} is a function of the padded size, not the size itself",
                          st.deps)
        return st.exact
    return None
