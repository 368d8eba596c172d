"""The graph cache alone, with real entries captured on the CPU runtime: LRU order, the graph count
and byte budget, typed fallback entries, and memory that adds up after evictions and clears."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hpuopt.runtime.base import tensor_nbytes
from hpuopt.runtime.cpu import CpuRuntime
from hpuopt.runtime.entry import Entry, capture
from hpuopt.runtime.graph_cache import GraphCache, Uncaptured
from hpuopt.runtime.signature import EXACT_KEYS, ArgRoles

ROLES = ArgRoles(tensor=(0, 1), copied=(0,), stable=(1,), keyed=(0,), mutated=())


def _entry(runtime: CpuRuntime, rows: int) -> Entry:
    x, w = torch.randn(rows, 4), torch.randn(4, 3)
    return capture(runtime, lambda a, b: [torch.tanh(a @ b)], ROLES, [x, w], EXACT_KEYS, 0, [True])


@pytest.fixture
def runtime() -> CpuRuntime:
    return CpuRuntime()


def _graph_bytes(runtime: CpuRuntime) -> int:
    return runtime.memory_report()["graph_bytes"]


def test_entry_bytes_are_the_graph_and_its_static_copies(runtime):
    entry = _entry(runtime, 8)
    copies = tensor_nbytes([entry.inputs[0]])  # the copied input's static buffer
    assert copies == 8 * 4 * 4
    assert entry.graph.nbytes == 8 * 3 * 4  # the runtime's count: the output buffer
    assert entry.nbytes == entry.graph.nbytes + copies
    assert _graph_bytes(runtime) == entry.graph.nbytes  # the runtime's count is left alone


def test_least_recently_used_is_evicted_first(runtime):
    cache = GraphCache(runtime.release, max_graphs=2)
    a, b, c, d = (_entry(runtime, n) for n in (1, 2, 3, 4))
    cache.put(("a",), a)
    cache.put(("b",), b)
    assert cache.get(("a",)) is a  # a is now the most recently used
    cache.put(("c",), c)
    assert list(cache.entries) == [("a",), ("c",)]
    assert cache.get(("b",)) is None
    cache.put(("d",), d)
    assert list(cache.entries) == [("c",), ("d",)]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 2)
    assert _graph_bytes(runtime) == c.graph.nbytes + d.graph.nbytes  # evicted ones released


def test_byte_budget_evicts_until_it_holds_but_keeps_the_newest(runtime):
    a, b, c = (_entry(runtime, 16) for _ in range(3))
    budget = a.nbytes * 2 + a.nbytes // 2
    cache = GraphCache(runtime.release, max_graphs=10, max_bytes=budget)
    cache.put(("a",), a)
    cache.put(("b",), b)
    assert cache.evictions == 0 and cache.held_bytes() == a.nbytes + b.nbytes
    cache.put(("c",), c)
    assert list(cache.entries) == [("b",), ("c",)] and cache.evictions == 1
    assert cache.held_bytes() <= budget
    huge = _entry(runtime, 4096)
    assert huge.nbytes > budget
    cache.put(("huge",), huge)  # over the budget alone: held, everything older evicted
    assert list(cache.entries) == [("huge",)] and cache.evictions == 3
    assert cache.held_bytes() == huge.nbytes


def test_fallback_entries_are_typed_and_hold_no_bytes(runtime):
    cache = GraphCache(runtime.release, max_graphs=3)
    entry = _entry(runtime, 5)
    cache.put((5,), entry)
    cache.put((6,), Uncaptured("an op a graph cannot hold"))
    assert cache.get((6,)) == Uncaptured("an op a graph cannot hold")
    assert cache.held_bytes() == entry.nbytes
    assert not cache.all_captured()
    assert cache.describe_keys() == ["(5)", "(6) (uncaptured)"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.get((6,)).reason = "changed"  # type: ignore[union-attr]
    cache.drop((6,))
    assert cache.all_captured()


def test_fallback_entries_count_against_max_graphs(runtime):
    cache = GraphCache(runtime.release, max_graphs=2)
    first = _entry(runtime, 3)
    cache.put((1,), first)
    cache.put((2,), Uncaptured("first"))
    cache.put((3,), Uncaptured("second"))
    assert list(cache.entries) == [(2,), (3,)] and cache.evictions == 1
    assert cache.held_bytes() == 0 and _graph_bytes(runtime) == 0


def test_held_bytes_stay_consistent_after_replacing_evicting_and_clearing(runtime):
    cache = GraphCache(runtime.release, max_graphs=3)
    entries = {n: _entry(runtime, n) for n in (2, 5, 7, 9)}
    for n, e in entries.items():
        cache.put((n,), e)
    held = [e for e in cache.entries.values() if isinstance(e, Entry)]
    assert cache.held_bytes() == sum(e.nbytes for e in held)
    assert _graph_bytes(runtime) == sum(e.graph.nbytes for e in held)
    again = _entry(runtime, 7)
    cache.put((7,), again)  # the same key captured again: the old graph is released once
    assert cache.entries[(7,)] is again
    held = list(cache.entries.values())
    assert cache.held_bytes() == sum(e.nbytes for e in held)
    assert _graph_bytes(runtime) == sum(e.graph.nbytes for e in held)
    cache.fallback_reasons[(1,)] = "why"
    cache.clear()
    assert cache.held_bytes() == 0 and not cache.entries and not cache.fallback_reasons
    assert _graph_bytes(runtime) == 0
    assert (cache.hits, cache.misses) == (0, 0)  # lookups counted only by get
