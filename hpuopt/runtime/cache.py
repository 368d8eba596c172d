"""The graph cache: one per static piece, mapping an input signature to a captured graph.

Why a cache, and what is in a key
---------------------------------
A device graph replays fixed work on fixed buffers: every shape, stride and Python scalar it was
captured with is baked in. A static piece of a Dynamo graph, however, is called with whatever
its symbolic inputs happen to be on that call. So each piece keeps a small LRU map from an input
*signature* to a :class:`CapturedGraph`, bounded by ``Config.max_graphs``.

The signature only holds what can vary: Dynamo's guards already pin the dtype, device and
(for non-dynamic dimensions) the shape and strides of the graph's inputs, and every value
computed inside the graph is a pure function of those. What can vary is exactly what
``node.meta["val"]`` shows as symbolic: SymInt arguments (dynamic sizes, data-dependent sizes)
and tensors whose sizes or strides hold symbols. :func:`arg_plan` decides this once per piece
from the placeholders' metadata; the per-call key is then a tuple over those arguments only, and
a fully static piece has the empty key — one dictionary lookup per call.

Inputs: copied, or stable
-------------------------
Replay reads static buffers. Activations are copied into them (``copy_``, one per tensor input).
Parameters and buffers of the module are *stable*: their storage lives as long as the module and
its address does not change between calls, so the graph reads them in place with no copy — but
an address change (``p.data = ...``, ``load_state_dict`` that reallocates, ``model.to``) is
checked on every call with ``data_ptr()`` and answered by re-capturing: a stale graph would read
freed or old memory.

Inputs the piece writes to (in-place ops kept by functionalisation) are copied back from their
static buffer after the replay, so the caller's tensor sees the write. Warm-up runs read clones
of such inputs, so their side effects happen exactly once, on the real call.

Outputs: what escapes is cloned
-------------------------------
Every replay writes the same output buffers. An output that only feeds later captured pieces is
copied into their static inputs within the same call and needs no clone. An output that escapes
— returned to AOTAutograd (so to the user, or saved for backward), or handed to a dynamic piece
— is cloned unless ``clone_outputs=False``, so nothing the user holds changes under them on a
later call.

Padding to buckets
------------------
A piece whose padding plan (``hpuopt.passes.buckets``) proves some dynamic dimensions safe to
pad gets a :class:`Padder`: the signature holds the *bucket* of each padded size instead of the
size, static buffers have the bucket's shape, each call copies the real rows into the front of
the buffer (zeroing the rest when the plan needs zero padding) and slices every output back to
its real extent. New static buffers start full of NaN in the pad region, so an analysis that
wrongly called an op safe shows up as NaN in tests rather than as a plausible number.

Failure
-------
A capture that fails (an op a device graph rejects, out of memory) marks that signature as a
fallback: the piece runs uncaptured for it, the reason is recorded and warned once, and the call
still returns the right answer. ``strict`` turns it into a :class:`FallbackError`.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from hpuopt.config import Config
from hpuopt.diagnostics.counters import counters
from hpuopt.errors import CaptureError, FallbackError
from hpuopt.records import PaddingPlan
from hpuopt.runtime.base import (
    CapturedGraph,
    Runtime,
    copy_into,
    eager_forward,
    empty_like_exact,
    tensor_nbytes,
)
from hpuopt.runtime.bucket_policy import BucketPolicy
from hpuopt.runtime.padder import ABOVE_LARGEST, Padder, slice_outputs
from hpuopt.runtime.signature import ArgPlan, arg_plan, describe_key, key_part, storage_key

log = logging.getLogger(__name__)


_MOVES_BEFORE_COPY = 2
"""A stable input that changed address this many times is copied each call instead."""

_SAME_BEFORE_STABLE = 2
"""A copied input whose address stayed the same over this many calls after the first is read in
place from then on (see :meth:`PieceRunner._observe`)."""

class _Entry:
    """One captured graph with its per-call load/unload work precomputed."""

    __slots__ = (
        "graph", "inputs", "outputs", "ptrs", "plan", "escaping", "fresh", "lent",
        "copy_targets", "plain_copies", "aliases", "escaping_copies",
    )

    def __init__(self, graph: CapturedGraph, plan: ArgPlan, escaping: Sequence[bool]) -> None:
        self.fresh = True  # not yet used: an executed capture already holds this call's result
        self.lent: list[weakref.ref] = []  # alias mode: outputs handed out uncloned
        self.graph = graph
        self.inputs = graph.static_inputs
        self.outputs = graph.static_outputs
        self.plan = plan
        self.ptrs = [graph.static_inputs[i].data_ptr() for i in plan.stable]
        self.copy_targets = [graph.static_inputs[i] for i in plan.copied]
        # broadcast buffers, whole-storage copies or a single input take the slow path
        self.plain_copies = len(plan.copied) > 1 and not plan.full_storage and not any(
            0 in t.stride() for t in self.copy_targets
        )
        self.aliases = graph.aliases
        self.escaping = [
            i for i, (e, o) in enumerate(zip(escaping, self.outputs)) if e and isinstance(o, torch.Tensor)
        ]
        alias_outputs = {a.output for a in graph.aliases}
        # escaping outputs that are not regenerated input views: these get cloned or lent
        self.escaping_copies = [i for i in self.escaping if i not in alias_outputs]


    def load_slowly(self, args: Sequence[Any]) -> None:
        full = self.plan.full_storage
        for i in self.plan.copied:
            if i in full:
                _flat_storage(self.inputs[i]).copy_(_flat_storage(args[i]), non_blocking=True)
            else:
                copy_into(self.inputs[i], args[i], non_blocking=True)


class PieceRunner:
    """Stands in for a static piece of a split graph: looks up, captures, replays.

    ``escaping[i]`` says whether output ``i`` leaves captured code in the same call (see the
    module docstring); ``stable[i]`` whether argument ``i`` is a parameter or buffer.
    """

    def __init__(
        self,
        name: str,
        gm: torch.fx.GraphModule,
        runtime: Runtime,
        config: Config,
        stable: Sequence[bool],
        escaping: Sequence[bool],
        padding: PaddingPlan | None = None,
    ) -> None:
        self.name = name
        self.gm = gm
        self.runtime = runtime
        self.config = config
        self.plan = arg_plan(gm, stable)
        self._padding_plan = padding
        self.padder = (
            Padder(padding, BucketPolicy(config))
            if padding is not None and padding.padded
            else None
        )
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        self.single_output = not isinstance(out_node.args[0], (tuple, list))
        self.escaping = list(escaping)
        self.entries: collections.OrderedDict[tuple, _Entry | str] = collections.OrderedDict()
        self.fallback_reasons: dict[tuple, str] = {}
        self.replays = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._clone = config.clone_outputs
        self._saw_args = False
        self._moves: dict[int, int] = {}
        self._promoted: set[int] = set()
        self._watch: dict[int, int] | None = {}  # promotion candidates -> address; None: done
        self._watch_calls = 0
        self._warned_stale = False
        self._replay_error: Exception | None = None

    def _demote(self, indices: Sequence[int]) -> None:
        """Copies these arguments each call from now on instead of reading them in place.

        Dynamo marks some inputs static that move every step (gradients, which ``zero_grad()``
        reallocates); capturing again on every call would be far slower than one copy each.
        """
        log.info("%s: arguments %s keep moving; copying them each call", self.name, indices)
        self._promoted -= set(indices)
        self._replan(set(self.plan.stable) - set(indices))

    def _replan(self, stable: set[int]) -> None:
        """Reads the tensor arguments in ``stable`` in place and copies the others from now on;
        every captured graph baked in the old split, so all are dropped (captured on demand)."""
        plan = self.plan
        copied = (set(plan.stable) | set(plan.copied)) - stable
        self.plan = dataclasses.replace(
            plan,
            stable=tuple(sorted(stable)),
            copied=tuple(sorted(copied)),
            mutated_copied=tuple(i for i in plan.mutated if i in copied),
        )
        self.clear()

    def _observe(self, args: Sequence[Any]) -> None:
        """Watches the first calls for copied inputs that never move, and reads those in place.

        Parameters and buffers are known stable from metadata. Other tensors can be just as
        stable without the metadata saying so: the gradients an optimizer step reads (torch
        does not mark them static), a KV cache or a state tensor the caller passes every call.
        Copying those into static buffers each call is the largest cost of a replay whose
        kernels are small. So the first call records the address of every copied input that
        could be read in place, each of the next :data:`_SAME_BEFORE_STABLE` calls drops those
        that moved, and what is left becomes stable: captured again once, then address-checked
        per call like a parameter, and copied again (for good) the first time it moves.
        Reading an input in place is what eager does, so this changes speed, never results.
        """
        self._watch_calls += 1
        watch = self._watch
        assert watch is not None
        if self._watch_calls == 1:
            watch.update((i, args[i].data_ptr()) for i in self._promotable(args))
        else:
            for i in [i for i, ptr in watch.items() if args[i].data_ptr() != ptr]:
                del watch[i]
            if watch and self._watch_calls > _SAME_BEFORE_STABLE:
                promote = [i for i in watch if i in self.plan.copied]
                watch.clear()
                if promote and all(isinstance(e, _Entry) for e in self.entries.values()):
                    self._promote(promote)
        if not watch:
            self._watch = None

    def _promotable(self, args: Sequence[Any]) -> list[int]:
        plan, device = self.plan, self.runtime.name
        skip = {*plan.keyed, *plan.full_storage, *self._moves}
        return [
            i for i in plan.copied
            if i not in skip
            and isinstance(args[i], torch.Tensor)
            and (device == "cpu" or args[i].device.type == device)
        ]

    def _promote(self, indices: Sequence[int]) -> None:
        log.info("%s: arguments %s kept their address; reading them in place", self.name, indices)
        self._promoted |= set(indices)
        counters.promotions += 1
        self._replan(set(self.plan.stable) | set(indices))

    def _adopt_parameters(self, args: Sequence[Any]) -> None:
        """Refines the plan with the first call's arguments.

        Arguments that are ``nn.Parameter`` objects become stable: a backward graph receives
        the parameters its forward saved, which AOTAutograd does not mark static there, and
        copying every weight into a static buffer each step is waste (their addresses are
        checked per call like any stable input). Arguments the metadata calls tensors that
        arrive as something else (AOTAutograd's effect tokens arrive as ``None``) join the key.
        """
        self._saw_args = True
        plan = self.plan
        params = {i for i in plan.copied if isinstance(args[i], torch.nn.Parameter)}
        not_tensors = {i for i in plan.tensor if not isinstance(args[i], torch.Tensor)}
        if not (params or not_tensors):
            return
        self.plan = dataclasses.replace(
            plan,
            tensor=tuple(i for i in plan.tensor if i not in not_tensors),
            copied=tuple(i for i in plan.copied if i not in params | not_tensors),
            stable=tuple(sorted((set(plan.stable) | params) - not_tensors)),
            mutated=tuple(i for i in plan.mutated if i not in not_tensors),
            mutated_copied=tuple(
                i for i in plan.mutated_copied if i not in params | not_tensors
            ),
            keyed=tuple(sorted(set(plan.keyed) | not_tensors)),
            full_storage=tuple(i for i in plan.full_storage if i not in not_tensors),
        )

    # -- the hot path ---------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        if self._watch is not None:
            self._observe(args)
        if self.padder is not None:
            return self._call_padded(args)
        return self._call_exact(args)

    def _exact_key(self, args: Sequence[Any]) -> tuple:
        plan = self.plan
        key = tuple(key_part(args[i]) for i in plan.keyed) if plan.keyed else ()
        if plan.full_storage:
            key += tuple(storage_key(args[i]) for i in plan.full_storage)
        return key

    def _call_exact(self, args: Sequence[Any]) -> Any:
        key = self._exact_key(args)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._miss(key, args)
            if isinstance(entry, _Entry) and entry.graph.executed:
                return self._finish(entry, args)  # capture ran this call's work already
        else:
            self.entries.move_to_end(key)
            self.hits += 1
            counters.cache_hits += 1
        if isinstance(entry, str):  # this signature falls back to running uncaptured
            counters.uncaptured_runs += 1
            return self.gm(*args)
        if [args[i].data_ptr() for i in self.plan.stable] != entry.ptrs:
            entry = self._recapture(key, args, entry)
            if entry.graph.executed:
                return self._finish(entry, args)
        if entry.plain_copies:  # one multi-tensor copy instead of a launch per input
            copied = self.plan.copied
            torch._foreach_copy_(entry.copy_targets, [args[i] for i in copied], non_blocking=True)
        elif self.plan.copied:
            entry.load_slowly(args)
        if not self._replay(entry):
            return self._replay_failed(key, args)
        return self._finish(entry, args)

    def _replay(self, entry: _Entry) -> bool:
        """Replays ``entry``; False (with the error kept for the caller) when the replay raised."""
        if entry.lent:
            self._retire_lent(entry)
        try:
            entry.graph.replay()
        except Exception as exc:  # handled by _replay_failed: recorded, strict raises
            self._replay_error = exc
            return False
        self.replays += 1
        counters.replays += 1
        return True

    def _call_padded(self, args: Sequence[Any]) -> Any:
        padder = self.padder
        assert padder is not None
        sizes = padder.sizes(args)
        if sizes is None:  # this call cannot be padded (e.g. a non-contiguous input)
            return self._call_exact_shapes(args)
        if sizes is ABOVE_LARGEST:
            counters.uncaptured_runs += 1
            self.fallback_reasons.setdefault(("above",), "size above the largest bucket")
            return self.gm(*args)
        key = padder.key(args, sizes, self.plan.keyed)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._miss(key, args, sizes)
        else:
            self.entries.move_to_end(key)
            self.hits += 1
            counters.cache_hits += 1
        if isinstance(entry, str):
            counters.uncaptured_runs += 1
            return self.gm(*args)
        if [args[i].data_ptr() for i in self.plan.stable] != entry.ptrs:
            entry = self._recapture(key, args, entry, sizes)
        padder.load(entry.inputs, args, sizes, self.plan.copied)
        if not (entry.graph.executed and entry.fresh) and not self._replay(entry):
            return self._replay_failed(key, args)
        entry.fresh = False
        return self._finish(entry, args, padder)

    def _call_exact_shapes(self, args: Sequence[Any]) -> Any:
        padder, self.padder = self.padder, None
        try:
            return self._call_exact(args)
        finally:
            self.padder = padder

    def _finish(self, entry: _Entry, args: Sequence[Any], padder: Padder | None = None) -> Any:
        """Writes mutated inputs back to the caller's tensors and hands out the outputs."""
        inputs = entry.inputs
        back = self.plan.mutated_copied
        if len(back) > 1:
            torch._foreach_copy_([args[i] for i in back], [inputs[i] for i in back])
        elif back:
            args[back[0]].copy_(inputs[back[0]])
        outs = entry.outputs
        if padder is not None:  # sliced back to the real sizes: no input views to regenerate
            outs = slice_outputs(padder.plan, outs, args, inputs)
            escaping = entry.escaping
        elif entry.aliases:
            outs = list(outs)
            for alias in entry.aliases:  # views of inputs: views of the caller's tensors
                outs[alias.output] = alias.regenerate(args)
            escaping = entry.escaping_copies
        else:
            escaping = entry.escaping
        if escaping:
            if outs is entry.outputs:  # never write into the graph's own output list
                outs = list(outs)
            if self._clone:
                for i in escaping:
                    outs[i] = outs[i].clone()
            else:
                for i in escaping:
                    outs[i] = _lend(outs[i])
                    entry.lent.append(weakref.ref(outs[i]))
        return outs[0] if self.single_output else tuple(outs)

    def _retire_lent(self, entry: _Entry) -> None:
        """Alias mode, just before a replay overwrites ``entry``'s outputs: every output handed
        out earlier that is still referenced becomes stale (see :func:`_mark_stale`)."""
        for ref in entry.lent:
            t = ref()
            if t is not None:
                counters.stale_outputs += 1
                _mark_stale(t, self.name)
                if not self._warned_stale:
                    self._warned_stale = True
                    warnings.warn(
                        f"hpuopt: {self.name} overwrites an output of an earlier call that is "
                        "still referenced (clone_outputs=False); clone it to keep it",
                        stacklevel=4,
                    )
        entry.lent.clear()

    # -- misses ---------------------------------------------------------------------------

    def _miss(self, key: tuple, args: Sequence[Any], sizes: dict | None = None) -> _Entry | str:
        if not self.entries and not self._saw_args:
            keyed = self.plan.keyed
            self._adopt_parameters(args)
            if self.plan.keyed != keyed:  # the key holds new arguments now
                if sizes is None:
                    key = self._exact_key(args)
                else:
                    assert self.padder is not None
                    key = self.padder.key(args, sizes, self.plan.keyed)
        self.misses += 1
        counters.cache_misses += 1
        entry = self._capture(key, args, sizes)
        self.entries[key] = entry
        budget = self.config.max_graph_bytes
        while len(self.entries) > 1 and (
            len(self.entries) > self.config.max_graphs or (budget and self.held_bytes() > budget)
        ):
            _, old = self.entries.popitem(last=False)
            self._release(old)
            self.evictions += 1
            counters.evictions += 1
        return entry

    def _recapture(
        self, key: tuple, args: Sequence[Any], stale: _Entry, sizes: dict | None = None
    ) -> _Entry:
        moved = [i for slot, i in enumerate(self.plan.stable)
                 if args[i].data_ptr() != stale.ptrs[slot]]
        log.info("%s: arguments %s changed address; capturing again", self.name, moved)
        counters.recaptures += 1
        self._release(self.entries.pop(key))
        for i in moved:
            self._moves[i] = self._moves.get(i, 0) + 1
        demote = [
            i for i in moved
            if i in self._promoted or self._moves[i] >= _MOVES_BEFORE_COPY
        ]
        if demote:  # the key is unchanged: only keyed arguments are in it
            self._demote(demote)
        entry = self._capture(key, args, sizes)
        self.entries[key] = entry
        if isinstance(entry, str):  # pragma: no cover - a capture that worked once fails now
            raise FallbackError(self.name, entry)
        return entry

    def _capture(self, key: tuple, args: Sequence[Any], sizes: dict | None = None) -> _Entry | str:
        if not self.config.capture:  # the user's choice: recorded, neither warned nor strict
            return "capture is disabled (capture=False)"
        plan = self.plan
        if plan.unsupported:
            return self._fallback(key, plan.unsupported)
        static: list[Any] = list(args)
        for i in plan.copied:
            static[i] = _static_copy(args[i], i in plan.full_storage)
        if sizes is not None:
            assert self.padder is not None
            self.padder.prepare(static, args, sizes)
        for i in plan.stable:
            static[i] = args[i].detach()  # the storage as of now, like a recorded address
        warm = list(static)
        for i in plan.mutated:
            warm[i] = static[i].clone()
        fn = self._flat_fn()
        start = time.perf_counter()
        try:
            graph = self.runtime.capture(fn, static, self.config.warmup_runs, warmup_inputs=warm)
        except CaptureError as exc:
            return self._fallback(key, str(exc))
        except torch.OutOfMemoryError as exc:
            return self._fallback(key, f"out of memory during capture: {exc}")
        seconds = time.perf_counter() - start
        counters.graphs_captured += 1
        counters.capture_seconds += seconds
        graph.capture_seconds = seconds
        graph.nbytes += tensor_nbytes([static[i] for i in plan.copied])
        log.debug("%s: captured key %s in %.3fs", self.name, key, seconds)
        return _Entry(graph, plan, self.escaping)

    def _flat_fn(self) -> Callable[..., list[Any]]:
        forward = eager_forward(self.gm)
        if self.single_output:
            return lambda *a: [forward(*a)]
        return lambda *a: list(forward(*a))

    def _replay_failed(self, key: tuple, args: Sequence[Any]) -> Any:
        """A replay raised: drop that graph, mark the signature uncaptured, and answer this call
        by running the piece as is (its inputs are the caller's, untouched by the replay)."""
        exc, self._replay_error = self._replay_error, None
        self._release(self.entries.pop(key, ""))
        reason = f"replay failed: {type(exc).__name__}: {exc}"
        if self.config.strict:
            raise FallbackError(self.name, reason) from exc
        self.entries[key] = self._fallback(key, reason)
        counters.uncaptured_runs += 1
        return self.gm(*args)

    def _fallback(self, key: tuple, reason: str) -> str:
        if self.config.strict:
            raise FallbackError(self.name, reason)
        counters.fallbacks += 1
        self.fallback_reasons[key] = reason
        if len(self.fallback_reasons) == 1:
            warnings.warn(f"hpuopt: {self.name} runs uncaptured: {reason}", stacklevel=3)
        log.info("%s: signature %s runs uncaptured: %s", self.name, key, reason)
        return reason

    def _release(self, entry: _Entry | str) -> None:
        if isinstance(entry, _Entry):
            self.runtime.release(entry.graph)

    # -- introspection --------------------------------------------------------------------

    def clear(self) -> None:
        """Drops every captured graph of this piece (they are captured again on demand)."""
        for entry in self.entries.values():
            self._release(entry)
        self.entries.clear()
        self.fallback_reasons.clear()

    def padding_summary(self) -> str:
        """What this piece pads, or why it runs at exact shapes (for explain)."""
        if self.padder is not None:
            dims = ", ".join(str(s) for s in self.padder.sources)
            zero = " with zero padding" if self.padder.zero else ""
            return f"pads {dims} to {self.padder.policy.describe()}{zero}"
        if self._padding_plan is not None and self._padding_plan.reasons:
            return "exact shapes: " + "; ".join(str(r) for r in self._padding_plan.reasons[:3])
        return ""

    def held_bytes(self) -> int:
        return sum(e.graph.nbytes for e in self.entries.values() if isinstance(e, _Entry))

    def describe_keys(self) -> list[str]:
        return [describe_key(k) + (" (uncaptured)" if isinstance(e, str) else "")
                for k, e in self.entries.items()]


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


def _mark_stale(t: torch.Tensor, piece: str) -> None:
    """Makes a later read of ``t`` raise, where this torch build can (CUDA builds)."""
    set_error = getattr(torch._C, "_set_storage_access_error_msg", None)
    if set_error is not None:
        set_error(
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
