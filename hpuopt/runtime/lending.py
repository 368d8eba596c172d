"""Lending a captured graph's output buffers: no clone, and nothing changes under its holder.

Why lend
--------
Every replay writes the same output buffers, so an output that leaves the graph used to be
cloned. In training most of those outputs are activations autograd saves for the backward and
gradients that land in ``.grad``: cloning them costs a copy of every activation and of every
gradient per step, and the memory of a second copy. Usually the clone is wasted: the backward
consumes the activations and frees them before the next forward replays; ``zero_grad()`` drops
the gradients before the next backward replays.

How
---
:meth:`Lender.lend` hands out a tensor over the buffer's memory with a storage of its *own*
(``StorageImpl``), not the graph's. Every tensor that can read the lent memory — the tensor
itself, its views, ``.data``, the copies of its metadata autograd keeps in saved variables —
holds that storage, and a storage's Python object lives exactly as long as its ``StorageImpl``,
so a ``weakref`` to it says whether anyone can still read the buffer through it (the liveness
test). Lent outputs sharing a buffer share one storage, so their aliasing is kept. Where a
runtime puts a graph's outputs in one allocation (the CPU runtime does), they all share one lent
storage: one liveness test per replay, and one copy-out of the whole allocation when any of them
is alive (keeping one gradient keeps that graph's gradients' memory). The hand-out is worked out
at capture (:func:`plan_loans`): per call, one storage per buffer and one view per output.

Before the runner lets a graph of the piece overwrite memory (a replay of any of its graphs —
they share a memory pool, so one graph's scratch can be another's output —, a capture, an
eviction), :meth:`Lender.protect` looks at what it lent since the last replay (one generation):
each storage still alive gets a fresh allocation holding the buffer's current values, swapped in
under it (``UntypedStorage._swap_data_ptr_``), so its holders keep the values they were given
and the graph keeps its address. What died costs nothing. Then the generation ends.

This is the liveness rule CUDA-graph trees apply to their pool (outputs alive at a replay must
not be overwritten), answered here by copying the survivors out instead of recording a new
graph beside them.

What is not covered: a raw address taken from a lent tensor (``numpy()``, DLPack,
``data_ptr()``) does not follow the swap. The runner therefore lends only what autograd keeps
to itself (saved activations) and gradients; outputs the caller receives directly are cloned.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

log = logging.getLogger(__name__)

CAN_LEND = hasattr(torch.UntypedStorage, "_swap_data_ptr_") and hasattr(
    torch._C, "_construct_storage_from_data_pointer"
)
"""Whether this torch build can redirect a lent storage; without it every output is cloned."""

_construct = getattr(torch._C, "_construct_storage_from_data_pointer", None)


def lendable(t: Any) -> bool:
    """A dense tensor with storage of its own type, which a lent storage can stand in for."""
    return (
        isinstance(t, torch.Tensor)
        and type(t) is torch.Tensor
        and t.layout == torch.strided
        and not t._is_zerotensor()
        and not t.is_conj()
        and not t.is_neg()
        and t.device.type != "meta"
    )


Layout = tuple[torch.UntypedStorage, int, int, torch.device, torch.dtype, int, torch.Size,
               tuple[int, ...]]
"""A buffer as lending needs it (:meth:`Lender.lend`, :func:`plan_loans`): its storage, address and size in bytes, device,
dtype, offset, size and strides."""


def layout_of(buf: torch.Tensor) -> Layout:
    storage = buf.untyped_storage()
    return (storage, storage.data_ptr(), storage.nbytes(), buf.device, buf.dtype,
            buf.storage_offset(), buf.size(), buf.stride())


Run = tuple[list[tuple[int, torch.Tensor]], torch.Size, tuple[int, ...], int, int]
"""Outputs lent in one call: their (position, buffer tensor), the common size and strides, the
first one's offset and the distance from one to the next (all in elements of their dtype)."""

LoanPlan = list[tuple[torch.UntypedStorage, int, torch.device, int,
                      list[tuple[torch.Tensor, list[Run]]]]]
"""Per buffer storage: the storage, its address, device and size, and per dtype an empty tensor
of it and the runs of outputs over the storage."""


def plan_loans(outputs: list[tuple[int, torch.Tensor]]) -> LoanPlan:
    """The lending of ``outputs`` (position, buffer) worked out once for every hand-out: grouped
    by the storage they are over (one lent storage each, so aliasing outputs keep aliasing), by
    dtype (each output is an alias of one tensor over the whole lent storage), and into runs of
    outputs alike (size and strides) at evenly spaced offsets, handed out by one ``unbind``
    (the CPU runtime lays its buffers out that way: ``out_writer._arena``)."""
    groups: dict[int, tuple[torch.UntypedStorage, int, torch.device, int, dict]] = {}
    for i, buf in outputs:
        storage, ptr, nbytes, device, dtype, offset, size, stride = layout_of(buf)
        group = groups.setdefault(ptr, (storage, ptr, device, nbytes, {}))
        group[4].setdefault(dtype, []).append((i, buf, offset, size, stride))
    return [(storage, ptr, device, nbytes,
             [(torch.empty(0, dtype=dtype, device=device), _runs(members))
              for dtype, members in by_dtype.items()])
            for storage, ptr, device, nbytes, by_dtype in groups.values()]


def _runs(members: list[tuple[int, torch.Tensor, int, torch.Size, tuple[int, ...]]]
          ) -> list[Run]:
    """``members`` split into maximal runs alike and evenly spaced (a run may be one)."""
    alike: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
    for i, buf, offset, size, stride in members:
        alike.setdefault((tuple(size), stride), []).append((offset, i, buf))
    runs: list[Run] = []
    for (size, stride), placed in alike.items():
        placed.sort(key=lambda p: p[0])
        run, step = [placed[0]], None
        for item in placed[1:]:
            gap = item[0] - run[-1][0]
            if step is None or gap == step:
                run, step = [*run, item], gap
                continue
            runs.append(_run(run, size, stride, step))
            run, step = [item], None
        runs.append(_run(run, size, stride, step))
    return runs


def _run(run: list[tuple[int, int, torch.Tensor]], size: tuple[int, ...],
         stride: tuple[int, ...], step: int | None) -> Run:
    return [(i, buf) for _, i, buf in run], torch.Size(size), stride, run[0][0], step or 0


class Lender:
    """What one piece lent since its last replay, and the copy-out that protects it.

    When the lender itself goes (its runner was dropped), what it lent that is still alive is
    copied out first: the buffers die with the runner's graphs.
    """

    __slots__ = ("__weakref__", "_lent")

    def __init__(self) -> None:
        self._lent: list[tuple[weakref.ref, torch.UntypedStorage]] = []
        """(a weak reference to each lent storage, the buffer's storage it stands over: kept
        so that the memory outlives an evicted graph until the next :meth:`protect`)."""
        done = weakref.finalize(self, _copy_out, self._lent)
        done.atexit = False

    def __len__(self) -> int:
        return len(self._lent)

    def lend(self, buf: torch.Tensor, shared: dict[int, torch.UntypedStorage]) -> torch.Tensor:
        """A tensor like ``buf`` over its memory, on a storage of its own. ``shared`` maps a
        buffer's address to the storage lent over it in this hand-out (one per buffer)."""
        storage, ptr, nbytes, device, dtype, offset, size, stride = layout_of(buf)
        own = shared.get(ptr)
        if own is None:
            own = _construct(ptr, device, nbytes)  # type: ignore[misc]
            own._hpuopt_lent = True  # type: ignore[attr-defined]  # see lent_storage
            shared[ptr] = own
            self._lent.append((weakref.ref(own), storage))
        return torch.empty(0, dtype=dtype, device=device).set_(own, offset, size, stride)

    def lend_planned(self, plan: LoanPlan, outs: list[Any]) -> int:
        """Lends the outputs ``plan`` names (:func:`plan_loans`) in place in ``outs``: one
        storage per buffer storage, each run of outputs one call. An output that is not the
        planned buffer (a runtime that hands fresh tensors back) is lent by its own layout.
        Returns how many were lent.

        The lent tensors are made below autograd's view tracking: each is a tensor of its own
        over the lent storage (its own version counter, not a view autograd would detach
        before saving it or refuse to let accumulate in place)."""
        lent = self._lent
        shared: dict[int, torch.UntypedStorage] = {}
        count = 0
        with torch._C._AutoDispatchBelowADInplaceOrView():
            for storage, ptr, device, nbytes, by_dtype in plan:
                own = _construct(ptr, device, nbytes)  # type: ignore[misc]
                own._hpuopt_lent = True  # type: ignore[attr-defined]  # see lent_storage
                lent.append((weakref.ref(own), storage))
                shared[ptr] = own
                for empty, runs in by_dtype:
                    flat = empty.new_empty(0).set_(own)
                    for members, size, stride, offset, step in runs:
                        if len(members) == 1:
                            views: Any = (flat.as_strided(size, stride, offset),)
                        else:
                            views = flat.as_strided((len(members), *size), (step, *stride),
                                                    offset).unbind(0)
                        for (i, buf), view in zip(members, views):
                            outs[i] = view if outs[i] is buf else self.lend(outs[i], shared)
                        count += len(members)
        return count

    def protect(self) -> int:
        """Before the piece may overwrite its buffers: every lent storage still alive gets a
        copy of its values swapped in; ends the generation. Returns how many were copied."""
        return _copy_out(self._lent)


def lent_storage(t: Any) -> bool:
    """Whether ``t`` reads memory a piece lent (its storage is a lent one, copied out or not).

    A backward reads such arguments in place from its first capture: they are a forward's
    buffers, at one address for every step, and the per-call address check catches the step
    where one moved (it was copied out)."""
    return isinstance(t, torch.Tensor) and getattr(t.untyped_storage(), "_hpuopt_lent", False)


def _copy_out(lent: list[tuple[weakref.ref, torch.UntypedStorage]]) -> int:
    copied = 0
    for ref, _ in lent:
        own = ref()
        if own is not None:
            fresh = torch.UntypedStorage(own.nbytes(), device=own.device)
            fresh.copy_(own)
            own._swap_data_ptr_(fresh)  # own now owns the copy; fresh dies with the address
            copied += 1
    lent.clear()
    return copied


def lent_positions(kind: str, num_outputs: int, fw_metadata: Any) -> frozenset[int]:
    """The positions of an AOT graph's outputs that may be lent: a forward's activations saved
    for backward, every output of a backward (gradients). An inference graph's outputs all reach
    the caller: none.

    A forward returns its effect tokens, then ``num_forward`` outputs the caller sees (mutated
    inputs, user outputs, their bases, an RNG offset), then the tensors saved for backward, then
    opaque objects and symbolic sizes saved for backward. Counting the tokens the metadata
    records can only move the start later (tokens unlifted from the graph): it never marks an
    output the caller sees. A forward whose metadata lacks this layout lends nothing."""
    if kind == "backward":
        return frozenset(range(num_outputs))
    if kind != "forward" or fw_metadata is None:
        return frozenset()
    try:
        start = len(fw_metadata.tokens or ()) + int(fw_metadata.num_forward)
        trailing = int(fw_metadata.num_symints_saved_for_bw) + int(
            getattr(fw_metadata, "num_opaque_objects_saved_for_bw", 0) or 0
        )
    except (AttributeError, TypeError, ValueError):
        log.debug("forward metadata without the saved-tensor layout: nothing is lent")
        return frozenset()
    return frozenset(range(start, num_outputs - trailing))
