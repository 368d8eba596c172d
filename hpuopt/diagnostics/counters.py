"""Process-wide counters with a delta assertion for tests.

``hpuopt.counters`` counts what every compiled graph did. Tests turn "it captured once" into one
line::

    with hpuopt.counters.expect(graphs_captured=1, replays=2):
        model(x); model(x)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass
class Counters:
    """Running totals. Fields are plain numbers; ``snapshot()`` copies them."""

    dynamo_graphs: int = 0
    """Graphs Dynamo handed to the backend."""
    aot_graphs: int = 0
    """Forward, backward and inference graphs compiled."""
    pieces_static: int = 0
    pieces_dynamic: int = 0
    graphs_captured: int = 0
    replays: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    evictions: int = 0
    recaptures: int = 0
    """Captures redone because a stable input (parameter, buffer) changed address."""
    promotions: int = 0
    """Pieces that began reading some copied inputs in place because their address never
    changed (each such piece is captured once more)."""
    fallbacks: int = 0
    """Keys whose capture failed, so the piece runs uncaptured for them."""
    stale_outputs: int = 0
    """Alias mode: outputs still referenced when a later replay overwrote them."""
    static_copies: int = 0
    """Tensors copied into a captured graph's static input buffers before its replays (one per
    copied input per replay; inputs read in place cost none)."""
    output_clones: int = 0
    """Outputs of captured graphs cloned as they were handed out (they reach the caller)."""
    outputs_lent: int = 0
    """Outputs handed out without a clone: activations saved for backward and gradients, lent
    with their liveness tracked, and every escaping output under ``clone_outputs=False``."""
    lent_copies: int = 0
    """Lent outputs still alive when their piece was about to overwrite them (a second forward
    before the backward, gradients kept across backwards): copied out then, so they kept their
    values."""
    uncaptured_runs: int = 0
    """Runs of a static piece without a graph (fallbacks, ``capture=False``)."""
    capture_seconds: float = 0.0
    piece_compiles: int = 0
    """Compilations of static pieces by the piece compiler (per key, or one symbolic compile
    shared by a piece's keys)."""
    compile_seconds: float = 0.0
    """Time those compilations took (part of the first call of each new key)."""
    compile_fallbacks: int = 0
    """Keys whose compile failed, so their piece runs its ATen ops (still captured)."""
    real_elements: int = 0
    """Elements of padded inputs that carried real data."""
    padded_elements: int = 0
    """Elements of padded inputs that were padding (waste)."""

    @property
    def pad_waste(self) -> float:
        """The share of padded inputs' elements that was padding."""
        total = self.real_elements + self.padded_elements
        return self.padded_elements / total if total else 0.0

    def snapshot(self) -> Counters:
        return dataclasses.replace(self)

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())

    def delta(self, since: Counters) -> dict[str, float]:
        return {
            f.name: getattr(self, f.name) - getattr(since, f.name)
            for f in dataclasses.fields(self)
        }

    @contextlib.contextmanager
    def expect(self, **expected: float) -> Iterator[None]:
        """Asserts that the block changes each named counter by exactly the given amount."""
        unknown = set(expected) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise AttributeError(f"unknown counters {sorted(unknown)}")
        before = self.snapshot()
        yield
        got = self.delta(before)
        wrong = {k: (v, got[k]) for k, v in expected.items() if got[k] != v}
        if wrong:
            detail = ", ".join(f"{k}: expected +{e}, got +{g}" for k, (e, g) in wrong.items())
            raise AssertionError(f"counter deltas differ: {detail}")


counters = Counters()
