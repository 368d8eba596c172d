"""One captured graph of a piece and its per-call work: copy in, replay, write back, hand out.

Inputs
------
Replay reads static buffers: :func:`capture` makes a copy of every copied argument (the whole
storage for one read through ``as_strided``) and hands stable arguments over as they are, like a
recorded address. Each call copies the copied arguments in (:meth:`Entry.copy_in`): one
multi-tensor copy when it can, one copy per input for broadcast buffers and whole storages.
Inputs the piece writes to (in-place ops kept by functionalisation) are copied back from their
static buffer after the replay (:meth:`Entry.write_back`), so the caller's tensor sees the write.
Warm-up runs read clones of such inputs, so their side effects happen exactly once, on the real
call.

Outputs: what escapes is lent or cloned
---------------------------------------
Every replay writes the same output buffers. An output that only feeds later captured pieces is
copied into their static inputs within the same call and needs no clone. An output that escapes
is handed out by :meth:`Entry.hand_out` in one of three ways:

* *lent with liveness* — activations autograd saves for backward and gradients (the runner says
  which, ``lend``): a tensor over the buffer itself, and before the piece may overwrite its
  buffers whatever is still alive is copied out (:mod:`hpuopt.runtime.lending`). What an exact
  call lends and clones is planned once per entry (:attr:`Entry.lend_plan`);
* *cloned* — everything else that reaches the caller or a dynamic piece, so nothing the user
  holds changes under them on a later call;
* *lent without liveness* (``clone_outputs=False``, alias mode): every escaping output is the
  graph's memory, and the next replay of any graph of the piece (they share a memory pool, so
  one graph's scratch can be another's output) marks those still referenced as stale
  (:func:`retire_lent`).

An output that is a view of an input is regenerated as that view of the caller's tensor
(:meth:`Entry.exact_outputs`), as in eager.

Memory
------
An entry's :attr:`~Entry.nbytes` is the runtime's count for the graph plus the static copies
made here, fixed when the entry is made; the graph cache sums it. The runtime's
:class:`CapturedGraph` is never changed after the runtime returns it.
"""

from __future__ import annotations

import operator
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from hpuopt.diagnostics.counters import counters
from hpuopt.runtime.base import (
    CapturedGraph,
    Runtime,
    clone_exact,
    copy_into,
    eager_forward,
    empty_like_exact,
    tensor_nbytes,
)
from hpuopt.runtime.lending import Lender, lendable, plan_loans
from hpuopt.runtime.signature import ArgRoles

if TYPE_CHECKING:
    from hpuopt.runtime.signature import KeyStrategy


class Entry:
    """One captured graph with its per-call load/unload work precomputed."""

    __slots__ = (
        "aliases", "all_ptrs", "capture_seconds", "copy_targets", "escaping", "escaping_copies",
        "exact_cloned", "exact_escaping", "fresh", "graph", "inputs", "lend_plan", "lent",
        "nbytes", "outputs", "plain_copies", "ptrs", "roles", "stable_args", "stable_list",
    )

    def __init__(
        self,
        graph: CapturedGraph,
        roles: ArgRoles,
        escaping: Sequence[bool],
        nbytes: int = 0,
        capture_seconds: float = 0.0,
        lend: Sequence[bool] = (),
    ) -> None:
        self.fresh = True  # not yet used: an executed capture already holds this call's result
        self.graph = graph
        self.nbytes = nbytes
        self.capture_seconds = capture_seconds
        self.inputs = graph.static_inputs
        self.outputs = graph.static_outputs
        self.roles = roles
        self.ptrs = [graph.static_inputs[i].data_ptr() for i in roles.stable]
        # the per-call address check, in C++ where the build has it (see same_addresses)
        self.all_ptrs: list[int | None] = [None] * len(graph.static_inputs)
        for i, ptr in zip(roles.stable, self.ptrs):
            self.all_ptrs[i] = ptr
        self.stable_args = _getter(roles.stable)
        self.stable_list = list(roles.stable)  # the C++ check takes lists only
        self.copy_targets = [graph.static_inputs[i] for i in roles.copied]
        # broadcast buffers, whole-storage copies or a single input take the slow path
        self.plain_copies = len(roles.copied) > 1 and not roles.full_storage and not roles.host and (
            not any(0 in t.stride() for t in self.copy_targets)
        )
        self.aliases = graph.aliases
        self.escaping = [
            i for i, (e, o) in enumerate(zip(escaping, self.outputs))
            if e and isinstance(o, torch.Tensor)
        ]
        alias_outputs = {a.output for a in graph.aliases}
        # escaping outputs that are not regenerated input views: these get cloned or lent
        self.escaping_copies = [i for i in self.escaping if i not in alias_outputs]
        # escaping outputs handed out without a clone, their liveness tracked (lending.py)
        self.lent = frozenset(
            i for i in self.escaping if i < len(lend) and lend[i] and lendable(self.outputs[i])
        )
        # an exact call's hand-out, worked out once: what is lent (grouped by buffer), cloned
        # (a list of its own: a bucketed call hands ``escaping`` over, and takes the slow path)
        exact = list(self.escaping_copies if self.aliases else self.escaping)
        self.exact_escaping = exact
        self.lend_plan = plan_loans([(i, self.outputs[i]) for i in exact if i in self.lent])
        self.exact_cloned = [i for i in exact if i not in self.lent]

    def same_addresses(self, args: Sequence[Any]) -> bool:
        """Whether every stable argument is where it was at capture.

        Every call pays this, for every parameter: a Python loop over hundreds of tensors costs
        more than a whole graph replay. Builds with CUDA have the C++ comparison CUDA-graph trees
        use; elsewhere one ``map`` over the stable arguments does it."""
        if not self.stable_list:
            return True
        if _PTRS_EQUAL is not None:
            return _PTRS_EQUAL(list(args), self.all_ptrs, self.stable_list)
        return list(map(_data_ptr, self.stable_args(args))) == self.ptrs

    def moved(self, args: Sequence[Any]) -> list[int]:
        """The stable arguments whose address changed since capture."""
        stable = self.roles.stable
        return [i for slot, i in enumerate(stable) if args[i].data_ptr() != self.ptrs[slot]]

    def copy_in(self, args: Sequence[Any]) -> None:
        """Copies this call's copied arguments into the static buffers."""
        if self.plain_copies:  # one multi-tensor copy instead of a launch per input
            copied = self.roles.copied
            torch._foreach_copy_(self.copy_targets, [args[i] for i in copied], non_blocking=True)
        elif self.copy_targets:
            full = self.roles.full_storage
            for i in self.roles.copied:
                if i in full:
                    _flat_storage(self.inputs[i]).copy_(_flat_storage(args[i]), non_blocking=True)
                else:
                    copy_into(self.inputs[i], args[i], non_blocking=True)

    def write_back(self, args: Sequence[Any]) -> None:
        """Copies the mutated static buffers back into the caller's tensors."""
        back = self.roles.mutated_copied
        if len(back) > 1:
            inputs = self.inputs
            torch._foreach_copy_([args[i] for i in back], [inputs[i] for i in back])
        elif back:
            args[back[0]].copy_(self.inputs[back[0]])

    def exact_outputs(self, args: Sequence[Any]) -> tuple[list[Any], Sequence[int]]:
        """The outputs, input views regenerated over the caller's tensors, and the indices of
        those to clone or lend. The list may be the graph's own: :meth:`hand_out` copies it."""
        if not self.aliases:
            return self.outputs, self.exact_escaping
        outs = list(self.outputs)
        for alias in self.aliases:  # views of inputs: views of the caller's tensors
            outs[alias.output] = alias.regenerate(args)
        return outs, self.exact_escaping

    def hand_out(self, outs: list[Any], escaping: Sequence[int], clone: bool,
                 lent: list[weakref.ref], lender: Lender) -> tuple[list[Any], int, int]:
        """``outs`` with the ``escaping`` ones lent by ``lender`` (those in :attr:`lent`) or
        cloned; with ``clone`` False (alias mode) all are lent without liveness, a weak
        reference to each going into ``lent``. Also returns how many were lent and cloned."""
        if not escaping:
            return outs, 0, 0
        if outs is self.outputs:  # never write into the graph's own output list
            outs = list(outs)
        if not clone:
            for i in escaping:
                if getattr(outs[i], "_hpuopt_fresh", False):
                    continue  # a dense copy made when the bucket was cut: the caller's own
                outs[i] = _lend(outs[i])
                lent.append(weakref.ref(outs[i]))
            return outs, len(escaping), 0
        if escaping is self.exact_escaping:  # an exact call: the plan made at capture
            lent_now = lender.lend_planned(self.lend_plan, outs)
            for i in self.exact_cloned:
                outs[i] = clone_exact(outs[i])
            return outs, lent_now, len(self.exact_cloned)
        return self._hand_out_each(outs, escaping, lender)

    def _hand_out_each(self, outs: list[Any], escaping: Sequence[int],
                       lender: Lender) -> tuple[list[Any], int, int]:
        """:meth:`hand_out` of outputs sliced back from a bucket: each lent by its layout."""
        lend = self.lent
        shared: dict[int, torch.UntypedStorage] = {}  # outputs over one buffer share a storage
        lent_now = cloned = 0
        for i in escaping:
            if getattr(outs[i], "_hpuopt_fresh", False):
                continue  # a dense copy made when the bucket was cut: the caller's own
            if i in lend:
                outs[i] = lender.lend(outs[i], shared)
                lent_now += 1
            else:
                outs[i] = clone_exact(outs[i])
                cloned += 1
        return outs, lent_now, cloned


_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
"""``(tensors, data_ptrs, indices) -> bool``: ``tensors[i].data_ptr() == data_ptrs[i]`` for every
``i`` in ``indices``, in C++ (``torch/csrc/cuda/Module.cpp``; CUDA builds only)."""

_data_ptr = torch.Tensor.data_ptr


def _getter(indices: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """``args -> the args at indices``, as a tuple (``operator.itemgetter`` returns a bare value
    for one index)."""
    if len(indices) == 1:
        only = indices[0]
        return lambda args: (args[only],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


def retire_lent(lent: list[weakref.ref], piece: str) -> int:
    """Alias mode, just before a replay may overwrite lent outputs: every one still referenced
    becomes stale (see :func:`_mark_stale`); returns how many were. Empties ``lent``."""
    stale = 0
    for ref in lent:
        t = ref()
        if t is not None:
            stale += 1
            _mark_stale(t, piece)
    lent.clear()
    counters.stale_outputs += stale
    return stale


def capture(
    runtime: Runtime,
    fn: Callable[..., list[Any]],
    roles: ArgRoles,
    args: Sequence[Any],
    keys: KeyStrategy,
    warmup_runs: int,
    escaping: Sequence[bool],
    pool: Any = None,
    compile_for: Callable[[list[Any]], Callable[..., list[Any]]] | None = None,
    lend: Sequence[bool] = (),
) -> Entry:
    """Captures ``fn`` on static buffers made from ``args`` as ``roles`` and ``keys`` say.

    ``compile_for(inputs)``, when given, returns the callable to capture instead of ``fn``,
    compiled for these static buffers (handed over with clones of the inputs the piece mutates,
    so a compiler that runs the piece leaves them alone).

    Raises what the runtime raises (:class:`hpuopt.errors.CaptureError`, out of memory).
    """
    static: list[Any] = list(args)
    for i in roles.copied:
        static[i] = _static_copy(args[i], i in roles.full_storage)
    for i in roles.host:  # read on the device, from a buffer refreshed every call
        static[i] = static[i].to(roles.device)
    keys.prepare(static, args)
    mutated = set(roles.mutated)
    for i in roles.stable:  # the storage as of now, like a recorded address
        # a written one stays the caller's tensor: its version counter must see the write
        static[i] = args[i].detach() if i in mutated else _in_place(args[i])
    warm = list(static)
    for i in roles.mutated:
        warm[i] = clone_exact(static[i])
    if compile_for is not None:
        fn = compile_for(warm)
    start = time.perf_counter()
    graph = runtime.capture(fn, static, warmup_runs, warmup_inputs=warm, pool=pool)
    seconds = time.perf_counter() - start
    counters.graphs_captured += 1
    counters.capture_seconds += seconds
    nbytes = graph.nbytes + tensor_nbytes([static[i] for i in roles.copied])
    return Entry(graph, roles, escaping, nbytes, seconds, lend)


def flat_forward(gm: torch.fx.GraphModule, single_output: bool) -> Callable[..., list[Any]]:
    """``gm``'s forward returning a list of outputs, as a runtime captures it."""
    forward = eager_forward(gm)
    if single_output:
        fn = lambda *a: [forward(*a)]
    else:
        fn = lambda *a: list(forward(*a))
    fn.hpuopt_graph = gm  # type: ignore[attr-defined]  # the CPU runtime writes its outputs in place
    return fn


def _in_place(t: torch.Tensor) -> torch.Tensor:
    """What a graph reads for an argument read in place: a parameter itself (detached), any
    other tensor through an alias of its memory that holds nothing alive.

    Every call checks that the argument is still at this address before a replay reads it, so
    the alias never reads memory its caller does not hold. Holding nothing matters for an
    activation a forward lent (a backward reads it in place once promoted): a reference from
    the graph would keep it alive forever, and the forward would copy it out at every replay.
    """
    if isinstance(t, torch.nn.Parameter) or not lendable(t) or _construct is None:
        return t.detach()
    storage = t.untyped_storage()
    alias = _construct(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        alias, t.storage_offset(), t.size(), t.stride()
    )


_construct = getattr(torch._C, "_construct_storage_from_data_pointer", None)


def _lend(buf: torch.Tensor) -> torch.Tensor:
    """A tensor over ``buf``'s memory with a storage of its own (alias mode's output).

    A separate storage lets a stale output be marked without touching the graph's buffer; the
    buffer is kept alive by the lent tensor, so evicting the graph cannot leave it dangling.
    """
    storage = buf.untyped_storage()
    own = torch._C._construct_storage_from_data_pointer(
        storage.data_ptr(), buf.device, storage.nbytes()
    )
    out = torch.empty(0, dtype=buf.dtype, device=buf.device)
    out.set_(own, buf.storage_offset(), buf.shape, buf.stride())
    out._hpuopt_buffer = buf  # type: ignore[attr-defined]
    return out


STALE_READS_RAISE = hasattr(torch._C, "_set_storage_access_error_msg")
"""Whether a read of an overwritten lent output raises (torch builds with CUDA support, on any
device) or returns the newer values (the CPU-only build cannot mark a storage)."""


def _mark_stale(t: torch.Tensor, piece: str) -> None:
    """Makes a later read of ``t`` raise, where this torch build can (:data:`STALE_READS_RAISE`)."""
    if STALE_READS_RAISE:
        torch._C._set_storage_access_error_msg(
            t,
            f"hpuopt: this output of {piece} was overwritten by a later call "
            "(clone_outputs=False); clone outputs you keep across calls",
        )


def _static_copy(t: torch.Tensor, full_storage: bool = False) -> torch.Tensor:
    if full_storage:  # the whole storage, viewed like ``t``
        base = _flat_storage(t).clone()
        return base.as_strided(t.shape, t.stride(), t.storage_offset())
    buf = empty_like_exact(t)
    copy_into(buf, t)
    return buf


def _flat_storage(t: torch.Tensor) -> torch.Tensor:
    """All of ``t``'s storage as a 1-D tensor of its dtype."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
