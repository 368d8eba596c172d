"""A piece's captured graphs by signature: LRU order, a count and a byte budget.

Each piece keeps a small LRU map from a signature (:mod:`hpuopt.runtime.signature`) to an
:class:`~hpuopt.runtime.entry.Entry`, bounded by ``Config.max_graphs`` and, when set, by
``Config.max_graph_bytes``: adding an entry evicts the least recently used ones until both
hold, never the newest. A signature whose capture failed holds an :class:`Uncaptured` entry
instead, so the piece runs as is for it without trying again.

Memory has one owner: an entry's ``nbytes`` (the runtime's graph plus its static copies, fixed
when the entry is made); :meth:`GraphCache.held_bytes` is their sum over the entries held, and
every entry that leaves is handed back to the runtime once.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from hpuopt.diagnostics.counters import counters
from hpuopt.runtime.base import CapturedGraph
from hpuopt.runtime.entry import Entry
from hpuopt.runtime.signature import describe_key


@dataclasses.dataclass(frozen=True)
class Uncaptured:
    """A signature the piece runs as is for (capture failed or is disabled), and why."""

    reason: str


Held = Entry | Uncaptured
"""What the cache holds for a signature."""


class GraphCache:
    """The LRU map of one piece (see the module docstring); counts hits, misses, evictions.

    ``release`` hands a graph back to the runtime when its entry leaves the cache.
    """

    def __init__(
        self, release: Callable[[CapturedGraph], None], max_graphs: int, max_bytes: int = 0
    ) -> None:
        self.entries: collections.OrderedDict[tuple, Held] = (
            collections.OrderedDict()
        )
        self.fallback_reasons: dict[tuple, str] = {}
        """Why signatures ran uncaptured since the last :meth:`clear` (kept after eviction)."""
        self.max_graphs = max_graphs
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._release = release

    def get(self, key: tuple) -> Held | None:
        """The entry of ``key`` (now the most recently used), or ``None`` (a miss)."""
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            counters.cache_misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        counters.cache_hits += 1
        return entry

    def put(self, key: tuple, entry: Held) -> None:
        """Holds ``entry`` for ``key`` as the most recently used; evicts what no longer fits."""
        self.drop(key)
        self.entries[key] = entry
        entries = self.entries
        while len(entries) > 1 and (
            len(entries) > self.max_graphs
            or (self.max_bytes and self.held_bytes() > self.max_bytes)
        ):
            _, old = entries.popitem(last=False)
            self._free(old)
            self.evictions += 1
            counters.evictions += 1

    def drop(self, key: tuple) -> None:
        """Removes ``key``'s entry, if any, and frees its graph."""
        old = self.entries.pop(key, None)
        if old is not None:
            self._free(old)

    def clear(self) -> None:
        """Drops every entry and every recorded fallback reason."""
        for entry in self.entries.values():
            self._free(entry)
        self.entries.clear()
        self.fallback_reasons.clear()

    def held_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if isinstance(e, Entry))

    def full_for_new(self) -> bool:
        """Whether the cache holds ``max_graphs`` captured graphs already (a new signature
        evicts one, or runs uncaptured under ``past_max_graphs='uncaptured'``)."""
        return sum(isinstance(e, Entry) for e in self.entries.values()) >= self.max_graphs

    def all_captured(self) -> bool:
        """Whether no signature held runs uncaptured."""
        return not any(isinstance(e, Uncaptured) for e in self.entries.values())

    def describe_keys(self) -> list[str]:
        return [
            describe_key(k) + (" (uncaptured)" if isinstance(e, Uncaptured) else "")
            for k, e in self.entries.items()
        ]

    def _free(self, entry: Held) -> None:
        if isinstance(entry, Entry):
            self._release(entry.graph)
