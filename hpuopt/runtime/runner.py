"""The piece runner: stands in for one static piece of a split graph; looks up, captures, replays.

Why a cache
-----------
A device graph replays fixed work on fixed buffers: every shape, stride and Python scalar it was
captured with is baked in. A static piece of a Dynamo graph, however, is called with whatever
its symbolic inputs happen to be on that call. So each piece keeps a small map from an input
*signature* to a captured graph, and a :class:`PieceRunner` composes the parts that do it:

* :mod:`~hpuopt.runtime.signature` — which arguments are copied, read in place or keyed, and the
  per-call key strategy: exact shapes, or buckets through the piece's
  :mod:`~hpuopt.runtime.padder`;
* :mod:`~hpuopt.runtime.address_policy` — which copied inputs to read in place because they
  never move, and which stable ones to copy because they keep moving;
* :mod:`~hpuopt.runtime.graph_cache` — the LRU map, its limits and its memory;
* :mod:`~hpuopt.runtime.entry` — one captured graph and its per-call work: copy in, replay,
  write back, clone or lend what escapes;
* :mod:`~hpuopt.runtime.lending` — what the piece lent, and the copy-out of what is still alive
  before the piece may overwrite it.

One call: pick the key strategy, look the key up (capture on a miss, capture again when a stable
input moved), copy the inputs in, protect what earlier calls lent, replay, write mutated inputs
back, hand the outputs out. The runner counts what each call copied in, cloned and lent (its
own totals for explain, and :data:`hpuopt.counters`).

Failure
-------
A capture that fails (an op a device graph rejects, out of memory) or a replay that raises marks
that signature as :class:`~hpuopt.runtime.graph_cache.Uncaptured`: the piece runs as is for it,
the reason is recorded and warned once, and the call still returns the right answer. ``strict``
turns it into a :class:`FallbackError`.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from hpuopt.config import Config
from hpuopt.diagnostics.counters import counters
from hpuopt.errors import CaptureError, FallbackError
from hpuopt.fx_utils import output_node
from hpuopt.records import PaddingPlan
from hpuopt.runtime.address_policy import AddressPolicy, Split, addresses
from hpuopt.runtime.base import Runtime
from hpuopt.runtime.compilers import EAGER, PieceCompilation, PieceCompiler
from hpuopt.runtime.entry import Entry, capture, retire_lent
from hpuopt.runtime.graph_cache import GraphCache, Held, Uncaptured
from hpuopt.runtime.lending import CAN_LEND, Lender, lent_storage
from hpuopt.runtime.padder import Padder, describe_padding
from hpuopt.runtime.signature import KeyStrategy, arg_roles, call_keys

log = logging.getLogger(__name__)

CAPTURE_OFF = Uncaptured("capture is disabled (capture=False)")
_PAST_LIMIT = Uncaptured("past max_graphs (past_max_graphs='uncaptured')")


class PieceRunner:
    """Stands in for a static piece of a split graph: looks up, captures, replays.

    ``escaping[i]`` says whether output ``i`` leaves captured code in the same call (see
    :mod:`hpuopt.runtime.entry`); ``stable[i]`` whether argument ``i`` is a parameter or buffer;
    ``lend[i]`` whether escaping output ``i`` only reaches autograd (an activation saved for
    backward, a gradient), so it may be lent instead of cloned (:mod:`hpuopt.runtime.lending`).
    """

    def __init__(self, name: str, gm: torch.fx.GraphModule, runtime: Runtime, config: Config,
                 stable: Sequence[bool], escaping: Sequence[bool],
                 padding: PaddingPlan | None = None,
                 compiler: PieceCompiler = EAGER, lend: Sequence[bool] = ()) -> None:
        self.name = name
        self.gm = gm
        self.runtime = runtime
        self.config = config
        self.roles = arg_roles(gm, stable)
        self.escaping = list(escaping)
        self.lend = [bool(b) for b in lend] if CAN_LEND else []
        self.single_output = not isinstance(output_node(gm).args[0], (tuple, list))
        self._padding_plan = padding
        self.padder = Padder.for_plan(padding, config, gm)
        self.cache = GraphCache(runtime.release, config.max_graphs, config.max_graph_bytes)
        self.compilation = PieceCompilation(name, gm, self.single_output, compiler, config)
        self.replays = 0
        self._addresses = AddressPolicy()
        self._adopted = False  # the first miss refines the roles with real arguments
        self._warned_stale = False
        self._lent: list[weakref.ref] = []  # alias mode: outputs handed out uncloned
        self._lender = Lender()  # outputs lent with liveness since the last replay
        # per-call work, totals (explain divides by the replays)
        self.inputs_copied_total = 0
        self.outputs_cloned = 0
        self.outputs_lent = 0
        self.lent_copied = 0
        """Lent outputs still alive when the piece was about to overwrite them: copied out."""
        # the memory pool of this piece's graphs, shared by its buckets and nobody else's:
        # one replay per call, so no other graph of the pool runs while its outputs are live
        self._pool = object()

    # what explain reads
    entries = property(lambda self: self.cache.entries)
    fallback_reasons = property(lambda self: self.cache.fallback_reasons)
    hits = property(lambda self: self.cache.hits)
    misses = property(lambda self: self.cache.misses)
    evictions = property(lambda self: self.cache.evictions)
    compiler = property(lambda self: self.compilation.compiler)
    """The piece compiler's name (``"eager"``, ``"inductor"``, ``"hpu_backend"``...)."""
    compiles = property(lambda self: self.compilation.compiles)
    compile_seconds = property(lambda self: self.compilation.compile_seconds)
    compile_fallbacks = property(lambda self: self.compilation.fallbacks)
    """Keys whose compile failed (they run the ATen ops, still captured), and why."""

    def __call__(self, *args: Any) -> Any:
        if self._addresses.watching:
            self._observe(args)
        found = self._lookup(args)
        if found is None:
            return self._run_uncaptured(args)
        keys, key, entry = found
        if self._lender:  # before the address check: a lent argument may move
            self._protect_lent()
        if not entry.same_addresses(args):
            entry = self._recapture(key, args, entry, keys)
        if entry.fresh:
            entry.fresh = False
            if entry.graph.executed:  # the capture ran this call's work already
                return self._finish(entry, args, keys)
        keys.load(entry, args)
        copied = len(entry.roles.copied)
        self.inputs_copied_total += copied
        counters.static_copies += copied
        if self._lent:  # alias mode: what earlier calls were lent may be overwritten now
            self._retire_lent()
        try:
            entry.graph.replay()
        except Exception as exc:  # noqa: BLE001 - recorded as a fallback; strict raises
            return self._replay_failed(key, args, exc)
        self.replays += 1
        counters.replays += 1
        return self._finish(entry, args, keys)

    def _lookup(self, args: Sequence[Any]) -> tuple[KeyStrategy, tuple, Entry] | None:
        """This call's key strategy, key and entry (made on a miss); ``None`` when the call runs
        as is (a size above the largest bucket, configured so, or an uncaptured signature)."""
        keys = call_keys(self.padder, args)
        if keys is None:  # a size above the largest bucket, configured to run uncaptured
            self.cache.fallback_reasons.setdefault(("above",), "size above the largest bucket")
            return None
        key = keys.key(self.roles, args)
        entry = self.cache.get(key)
        if entry is None:
            key, entry = self._miss(key, args, keys)
        if isinstance(entry, Uncaptured):
            return None
        return keys, key, entry

    def _retire_lent(self) -> None:
        if retire_lent(self._lent, self.name) and not self._warned_stale:
            self._warned_stale = True
            warnings.warn(f"hpuopt: {self.name} overwrites an output of an earlier call that is "
                          "still referenced (clone_outputs=False); clone it to keep it", stacklevel=2)

    def _protect_lent(self) -> None:
        """The piece may overwrite its buffers now: what it lent and is alive is copied out."""
        copied = self._lender.protect()
        if copied:
            self.lent_copied += copied
            counters.lent_copies += copied
            log.debug("%s: %d lent outputs still alive; copied out before the replay",
                      self.name, copied)

    def _finish(self, entry: Entry, args: Sequence[Any], keys: KeyStrategy) -> Any:
        """Writes mutated inputs back to the caller's tensors and hands out the outputs."""
        entry.write_back(args)
        outs, escaping = keys.outputs(entry, args)
        outs, lent, cloned = entry.hand_out(outs, escaping, self.config.clone_outputs,
                                            self._lent, self._lender)
        if lent or cloned:
            self.outputs_lent += lent
            self.outputs_cloned += cloned
            counters.outputs_lent += lent
            counters.output_clones += cloned
        return outs[0] if self.single_output else tuple(outs)

    def _run_uncaptured(self, args: Sequence[Any]) -> Any:
        counters.uncaptured_runs += 1
        return self.gm(*args)

    # -- misses, moves, failures ------------------------------------------------------------

    def _miss(self, key: tuple, args: Sequence[Any], keys: KeyStrategy) -> tuple[tuple, Held]:
        """Warms up and captures this signature (the key changes when the first call refines
        the roles); returns the key and the entry now held for it."""
        if not self._adopted:
            self._adopted = True
            roles, self.roles = self.roles, self.roles.adopt(args)
            if self.roles.keyed != roles.keyed:  # the key holds new arguments now
                key = keys.key(self.roles, args)
            self._read_lent_in_place(args)
        if self.cache.full_for_new() and self.config.past_max_graphs == "uncaptured":
            # the Gaudi bridge's max_graphs: a signature past the limit runs as is, unstored
            self.cache.fallback_reasons.setdefault(
                key, f"past max_graphs={self.config.max_graphs} (past_max_graphs='uncaptured')"
            )
            return key, _PAST_LIMIT
        entry = self._capture(key, args, keys)
        self.cache.put(key, entry)
        return key, entry

    def _read_lent_in_place(self, args: Sequence[Any]) -> None:
        """Copied arguments that another piece lent (a backward's saved activations) are read
        in place from the start, their address checked per call like a parameter's: no copy
        while the forward's buffers hold them (see :func:`~hpuopt.runtime.lending.lent_storage`).
        """
        copied, keyed = self.roles.copied, set(self.roles.keyed) | set(self.roles.full_storage)
        lent = [i for i in copied if i not in keyed and lent_storage(args[i])]
        if lent:
            stable = set(self.roles.stable) | set(lent)
            self.roles = self.roles.with_split(stable, set(copied) - stable)
            log.debug("%s: arguments %s are lent buffers; read in place", self.name, lent)

    def _recapture(self, key: tuple, args: Sequence[Any], stale: Entry, keys: KeyStrategy) -> Entry:
        moved = stale.moved(args)
        log.info("%s: arguments %s changed address; capturing again", self.name, moved)
        counters.recaptures += 1
        self.cache.drop(key)
        split = self._addresses.moved(self.roles, moved)
        if split is not None:  # the key is unchanged: only keyed arguments are in it
            log.info(
                "%s: arguments %s keep moving; copying them each call", self.name, split.changed
            )
            self._replan(split)
        entry = self._capture(key, args, keys)
        self.cache.put(key, entry)
        if isinstance(entry, Uncaptured):  # pragma: no cover - a capture that worked once fails
            raise FallbackError(self.name, entry.reason)
        return entry

    def _capture(self, key: tuple, args: Sequence[Any], keys: KeyStrategy) -> Held:
        if not self.config.capture:  # the user's choice: recorded, neither warned nor strict
            return CAPTURE_OFF
        self._protect_lent()  # a capture runs the piece and may evict a graph
        if self.roles.unsupported:
            return self._fallback(key, self.roles.unsupported)
        compilation = self.compilation
        try:
            entry = capture(self.runtime, compilation.eager, self.roles, args, keys,
                            self.config.warmup_runs, self.escaping, pool=self._pool,
                            compile_for=lambda static: compilation.forward_for(key, static),
                            lend=self.lend)
        except CaptureError as exc:
            return self._fallback(key, str(exc))
        except torch.OutOfMemoryError as exc:
            return self._fallback(key, f"out of memory during capture: {exc}")
        log.debug("%s: captured key %s in %.3fs", self.name, key, entry.capture_seconds)
        return entry

    def _replay_failed(self, key: tuple, args: Sequence[Any], exc: Exception) -> Any:
        """A replay raised: drop that graph, mark the signature uncaptured, and answer this call
        by running the piece as is (its inputs are the caller's, untouched by the replay)."""
        self.cache.drop(key)
        reason = f"replay failed: {type(exc).__name__}: {exc}"
        if self.config.strict:
            raise FallbackError(self.name, reason) from exc
        self.cache.put(key, self._fallback(key, reason))
        return self._run_uncaptured(args)

    def _fallback(self, key: tuple, reason: str) -> Uncaptured:
        if self.config.strict:
            raise FallbackError(self.name, reason)
        counters.fallbacks += 1
        reasons = self.cache.fallback_reasons
        reasons[key] = reason
        if len(reasons) == 1:
            warnings.warn(f"hpuopt: {self.name} runs uncaptured: {reason}", stacklevel=3)
        log.info("%s: signature %s runs uncaptured: %s", self.name, key, reason)
        return Uncaptured(reason)

    # -- promotion and demotion -------------------------------------------------------------

    def _observe(self, args: Sequence[Any]) -> None:
        """Reports this call's addresses to the address policy; applies a promotion."""
        seen = addresses(args, self._addresses.watched(self.roles), self.runtime.name)
        split = self._addresses.observe(self.roles, seen, self.cache.all_captured())
        if split is not None:
            log.info("%s: arguments %s kept their address; reading them in place", self.name,
                     split.changed)
            counters.promotions += 1
            self._replan(split)

    def _replan(self, split: Split) -> None:
        """Applies a new split; every graph baked in the old one, so all are dropped."""
        self.roles = self.roles.with_split(split.stable, split.copied)
        self.clear()

    # -- introspection ----------------------------------------------------------------------

    def clear(self) -> None:
        """Drops every captured graph of this piece (they are captured again on demand)."""
        self._protect_lent()
        self.cache.clear()

    def padding_summary(self) -> str:
        """What this piece pads, or why it runs at exact shapes (for explain)."""
        return describe_padding(self.padder, self._padding_plan)

    def held_bytes(self) -> int:
        return self.cache.held_bytes()

    def describe_keys(self) -> list[str]:
        return self.cache.describe_keys()
