"""Transfer rule of ``constant_pad_nd``, including alignment padding that is cut straight back.

On CUDA, scaled dot-product attention with a bias traced for the memory-efficient kernel pads the
bias's last (key) dim up to a multiple of 16 by ``16 - L % 16`` constants and slices the first
``L`` positions back (ATen's ``preprocess_mask``/``pad_bias``): only the storage gets aligned.
Padding a padded dim is unsafe on its own (rule 6: the constants would sit behind the pad, and the
amount reads the padded size), but padding *then slicing back to the dim's own extent* is the
identity on every position, real and pad alike. So ``constant_pad_nd`` along a padded dim is
accepted when every user of its result is such a slice-back; the result then gets the state of
what the slice-back yields (the operand's state), and nothing else ever reads the constants.
Everything else goes to the plain rule (``views._constant_pad``). Rule 6 of ``docs/padding.md``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import node_value
from hpuopt.passes.padding.binding import Row, _Op, _Rule
from hpuopt.passes.padding.domain import _Dim, _same, _same_dim, _Sym, _Tensor, _Unsafe
from hpuopt.passes.padding.rules.views import _constant_pad

aten = torch.ops.aten

_SLICES = (aten.slice.Tensor, aten.slice_copy.Tensor)


def _pad_amounts(op: _Op, rank: int) -> dict[int, tuple[Any, Any]]:
    """``{dim: (before, after)}`` of the ``pad`` argument (last dim first, as ATen lists it)."""
    pads = list(op.raw("pad"))
    return {rank - 1 - k // 2: (pads[k], pads[k + 1]) for k in range(0, len(pads) - 1, 2)}


def _reads_padded_size(op: _Op, value: Any) -> frozenset[Any]:
    st = op.an.state_of(value)
    return st.deps if isinstance(st, _Sym) else frozenset()


def _constant_pad_nd(op: _Op) -> _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    amounts = _pad_amounts(op, rank)
    touched = [d for d, (before, after) in amounts.items()
               if st.dim(d) is not None and not (before == 0 and after == 0)]
    for d, (before, after) in amounts.items():
        if st.dim(d) is None and (_reads_padded_size(op, before) or _reads_padded_size(op, after)):
            raise _Unsafe(f"constant_pad_nd pads the unpadded dim {d} by an amount that reads "
                          "the padded size", _reads_padded_size(op, before) |
                          _reads_padded_size(op, after))
    if not touched:
        return _constant_pad(op)
    if len(touched) > 1 or amounts[touched[0]][0] != 0:
        raise _Unsafe(f"constant_pad_nd pads the padded dim {touched[0]} {amounts[touched[0]]}: "
                      "the real run's border would sit behind the pad", {st.dim(touched[0]).source})
    d = touched[0]
    end = _sliced_back(op, d, st.dim(d))  # type: ignore[arg-type]
    dims = list(st.dims or ())
    dims[d] = end  # the slice-backs cut exactly this dim (tied to the operand's)
    return _Tensor(tuple(dims), st.pad, st.iota, st.fills)


def _sliced_back(op: _Op, d: int, dim: _Dim) -> _Dim:
    """The dim the result's users cut it back to: every user must be ``slice(result, d, 0,
    size, 1)`` with ``size`` exactly the extent of a dim laid out like the operand's ``d`` with
    the same traced extent (so the same real size), such as the key length the bias was built
    for. Returns that size's dim state, tied to the operand's; raises otherwise."""
    extent = op.shape("self")[d]
    rank = op.rank("self")
    why = (f"constant_pad_nd pads the padded dim {d} after its end, and not every user slices "
           "the constants back off: the real run's constants would sit behind the pad")
    found: _Dim | None = None
    users = list(op.node.users)
    for user in users:
        args = list(user.args) + [None] * 5
        if user.target not in _SLICES or args[0] is not op.node or \
                not isinstance(args[1], int) or args[1] % rank != d or \
                args[2] not in (None, 0) or args[4] not in (None, 1):
            raise _Unsafe(why, set(dim.sources))
        end = args[3]
        end_st = op.an.state_of(end)
        if not (isinstance(end_st, _Sym) and end_st.exact is not None and
                _same_dim(end_st.exact, dim) and _same(node_value(end), extent)) or \
                (found is not None and end_st.exact.source != found.source):
            raise _Unsafe(why, set(dim.sources))
        found = end_st.exact
    if found is None:
        raise _Unsafe(why, set(dim.sources))
    op.an.tie_dims(found, dim)
    return found


ROWS: tuple[Row, ...] = (
    ("constant_pad_nd: after the padded dim only when sliced back",
     _Rule(_constant_pad_nd, frozenset({"pad"})), ("constant_pad_nd",)),
)
