"""Pieces called directly: compiled per key, run on the caller's tensors, no device graph.

Where nothing is captured, static buffers buy nothing. Two places run that way:

* ``runtime="direct"`` (any device): every static piece is compiled by its piece compiler
  (``"auto"`` picks Inductor) once per key — an exact shape, or a bucket where the padding
  analysis proved padding safe — and each call hands the caller's tensors straight to the
  compiled callable. This is vLLM's piecewise compile without the CUDA graphs, or Inductor
  behind hpuopt's splitting and buckets; on the CPU it is the fast way to run, where the CPU
  runtime's capture is an emulation that pays a copy in and a copy out per call to reproduce
  device-graph semantics.
* the HPU runtime in the bridge's compile mode (``PT_HPU_LAZY_MODE=0``): HPU Graphs are a
  lazy-mode feature, so each piece goes to ``hpu_backend`` per key and is called as it is.

What stays the same as under capture: the split, the keys (so compilations are bounded by the
buckets), the padding plan (inputs padded into fresh tensors filled as the plan requires, outputs
cut back), strict mode and fallbacks. What does not apply: static buffers, address checks,
lending and clones — every output is a fresh tensor of its call, as in eager, and an input the
piece writes to is the caller's own (or, when padded, its real part is written back).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hpuopt.diagnostics.counters import counters
from hpuopt.runtime.base import CapturedGraph, clone_exact
from hpuopt.runtime.entry import Entry
from hpuopt.runtime.graph_cache import GraphCache, Held
from hpuopt.runtime.padder import slice_outputs
from hpuopt.runtime.runner import CAPTURE_OFF, PieceRunner
from hpuopt.runtime.signature import BucketKeys, KeyStrategy

log = logging.getLogger(__name__)


class DirectRuntime:
    """The runtime of ``runtime="direct"``: it captures nothing (see the module docstring)."""

    name = "direct"
    default_piece_compiler = "inductor"
    captures = False

    def capture(self, fn: Callable[..., Sequence[Any]], static_inputs: list[Any],
                warmup_runs: int = 0, warmup_inputs: list[Any] | None = None,
                pool: Any = None) -> CapturedGraph:  # pragma: no cover - never called
        raise NotImplementedError("the direct runtime captures nothing")

    def release(self, graph: CapturedGraph) -> None:
        return None

    def mark_step(self) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def memory_report(self) -> dict[str, int]:
        return {"graph_bytes": 0}


class DirectEntry(Entry):
    """One key's compiled callable (held in the piece's cache like a captured graph)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., list[Any]], seconds: float) -> None:
        # nothing of Entry's per-call machinery applies: no buffers, no graph
        self.fn = fn
        self.graph = None
        self.nbytes = 0
        self.capture_seconds = seconds
        self.fresh = False


class DirectRunner(PieceRunner):
    """A :class:`PieceRunner` that calls each key's compiled piece on the caller's tensors."""

    direct = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lend = []  # outputs are fresh per call: nothing is lent
        self.cache = GraphCache(lambda graph: None, self.config.max_graphs)

    def __call__(self, *args: Any) -> Any:
        found = self._lookup(args)
        if found is None:
            return self._run_uncaptured(args)
        keys, key, entry = found
        assert isinstance(entry, DirectEntry)
        try:
            if isinstance(keys, BucketKeys):
                outs = self._padded_call(entry, args, keys)
            else:
                outs = entry.fn(*args)
        except Exception as exc:
            if self.roles.mutated:  # it may have written the caller's tensors: no second run
                raise
            # like a replay that raises: this key runs the ATen ops from now on (strict raises)
            return self._replay_failed(key, args, exc)
        self.replays += 1
        counters.replays += 1
        return outs[0] if self.single_output else tuple(outs)

    def _padded_call(self, entry: DirectEntry, args: Sequence[Any], keys: BucketKeys) -> list[Any]:
        """Runs the bucket's callable on fresh padded copies of the padded inputs; writes the
        real part of any it mutates back; cuts the outputs back to their real extent."""
        padder, sizes = keys.padder, keys.sizes
        padded = list(args)
        padder.prepare(padded, args, sizes)
        padder.count(padded, args, self.roles.copied)
        outs = entry.fn(*padded)
        for i in self.roles.mutated:
            if i in padder.dims:
                args[i].copy_(padder.real_part(padded[i], i, sizes))
        return slice_outputs(padder.plan, outs, args, padded)

    def _capture(self, key: tuple, args: Sequence[Any], keys: KeyStrategy) -> Held:
        """Compiles the piece for ``key`` (the ``capture`` step of a capturing runner)."""
        if not self.config.capture:  # the user's choice: recorded, neither warned nor strict
            return CAPTURE_OFF
        if self.roles.unsupported:
            return self._fallback(key, self.roles.unsupported)
        example = list(args)
        if isinstance(keys, BucketKeys):
            keys.padder.prepare(example, args, keys.sizes)
        for i in self.roles.mutated:  # a compiler that runs the piece leaves them alone
            if isinstance(example[i], torch.Tensor):
                example[i] = clone_exact(example[i])
        start = time.perf_counter()
        fn = self.compilation.forward_for(key, example)
        seconds = time.perf_counter() - start
        log.debug("%s: key %s compiled in %.3fs", self.name, key, seconds)
        return DirectEntry(fn, seconds)
