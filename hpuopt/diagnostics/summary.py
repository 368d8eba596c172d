"""The summary ``explain()`` opens with: what the model holds, what ran how, and what cost most.

:func:`summarize` reads an :class:`~hpuopt.diagnostics.explain.ExplainReport` (never the runtime)
and returns a :class:`Summary`: the graphs and bytes held, the calls, the piece runs replayed
and run uncaptured, the padding waste, Dynamo's notes, and every :class:`Cost` — a reason
something was not captured or not padded, with the calls it affected, the user's source line
and what to do — ranked by calls affected. :func:`render_summary` writes it for people.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import TYPE_CHECKING

from hpuopt.diagnostics import wording
from hpuopt.diagnostics.dynamo import DynamoNote
from hpuopt.diagnostics.wording import link, nbytes, plural, short_source

if TYPE_CHECKING:
    from hpuopt.diagnostics.explain import ExplainReport, PieceReport

TOP = 3
"""How many costs the summary text lists (the data holds all of them)."""


@dataclasses.dataclass(frozen=True)
class Cost:
    """One reason something was not captured or not padded, summed over the graphs it shows in."""

    kind: str
    """``"not captured"`` (a piece runs as is), ``"runs uncaptured"`` (a captured piece fell
    back for some inputs) or ``"not padded"`` (captured once per exact size)."""
    calls: int
    """Calls affected: runs of the piece without a graph; for ``not padded``, calls of it."""
    what: str
    source: str | None
    """The user's source line (``file:line in fn: code``), when known."""
    fix: str
    link: str
    category: str
    """The split reason (``data_dependent_shape``...), ``fallback`` or ``padding``."""
    pieces: tuple[str, ...] = ()
    """The pieces it applies to (``g0.inference.submod_1``)."""
    captures: int = 0
    """For ``not padded``: the captures made because each size is captured on its own."""


@dataclasses.dataclass(frozen=True)
class Summary:
    dynamo_graphs: int
    calls: int
    """Calls of the compiled graphs (forward or inference), summed over Dynamo graphs."""
    captured_pieces: int
    dynamic_pieces: int
    device_graphs: int
    """Device graphs held now, over every captured piece."""
    held_bytes: int
    evictions: int
    """Graphs dropped by ``max_graphs`` / ``max_graph_bytes`` (each miss after is a capture)."""
    piece_runs: int
    """Runs of all pieces (each call runs every piece of its graph once)."""
    replays: int
    uncaptured_runs: int
    """Piece runs without a graph: pieces that run as is, and fallbacks of captured ones."""
    fallback_runs: int
    padded_pieces: int
    exact_pieces: int
    """Captured pieces whose varying sizes are not padded (one graph per size)."""
    pad_waste: float | None
    """Share of padded inputs' elements that were padding (process-wide counter), or None."""
    compile_seconds: float
    runtimes: tuple[str, ...]
    costs: tuple[Cost, ...]
    """Every cost, most calls affected first."""
    dynamo: tuple[DynamoNote, ...] = ()
    stale_outputs: int = 0


def summarize(report: ExplainReport) -> Summary:
    pieces = report.pieces
    captured = [p for p in pieces if p.captured]
    c = report.counters
    return Summary(
        dynamo_graphs=len(report.graphs),
        calls=sum(g.calls or 0 for g in report.graphs),
        captured_pieces=len(captured),
        dynamic_pieces=len(pieces) - len(captured),
        device_graphs=sum(
            1 for p in captured for k in p.graphs if not k.endswith("(uncaptured)")
        ),
        held_bytes=sum(p.held_bytes for p in captured),
        evictions=sum(p.evictions for p in captured),
        piece_runs=sum(p.calls for p in pieces),
        replays=sum(p.replays for p in captured),
        uncaptured_runs=sum(p.uncaptured_runs for p in pieces),
        fallback_runs=sum(p.uncaptured_runs for p in captured),
        padded_pieces=sum(1 for p in captured if p.padded or p.padding.startswith("pads")),
        exact_pieces=sum(1 for p in captured if p.not_padded),
        pad_waste=c.pad_waste if c.real_elements else None,
        compile_seconds=sum(g.compile_seconds for g in report.graphs),
        runtimes=tuple(dict.fromkeys(a.runtime for g in report.graphs for a in g.aot_graphs)),
        costs=_costs(report),
        dynamo=tuple(report.dynamo),
        stale_outputs=c.stale_outputs,
    )


# -- costs ------------------------------------------------------------------------------------


def _costs(report: ExplainReport) -> tuple[Cost, ...]:
    found: dict[tuple, Cost] = {}

    def add(key: tuple, cost: Cost) -> None:
        old = found.get(key)
        if old is not None:
            cost = dataclasses.replace(
                old,
                calls=old.calls + cost.calls,
                pieces=old.pieces + cost.pieces,
                captures=old.captures + cost.captures,
            )
        found[key] = cost

    for g in report.graphs:
        for a in g.aot_graphs:
            for p in a.pieces:
                name = f"g{g.index}.{a.kind}.{p.name}"
                for key, cost in _piece_costs(p, name):
                    add(key, cost)
    order = {"not captured": 0, "runs uncaptured": 1, "not padded": 2}
    return tuple(sorted(found.values(), key=lambda c: (-c.calls, order.get(c.kind, 3))))


def _piece_costs(p: PieceReport, name: str) -> list[tuple[tuple, Cost]]:
    out = []
    if not p.captured:
        main = [r for r in p.reasons if r.reason != "host_scalar"]
        seen: set = set()
        for r in main:  # one cost per user line: the first reason found there
            where = r.source or r.op
            if where in seen:
                continue
            seen.add(where)
            out.append((
                ("not captured", r.reason, where),
                Cost("not captured", p.calls, wording.describe_split(r), short_source(r.source),
                     wording.split_fix(r), link("not_captured"), r.reason, (name,)),
            ))
        return out
    if p.has_uncaptured_keys:
        reasons = list(dict.fromkeys(p.fallbacks)) or ["capture is disabled (capture=False)"]
        for i, reason in enumerate(reasons):
            what, fix = wording.describe_fallback(reason)
            topic = "results" if "capture=false" in reason.lower() else "fallback"
            out.append((
                ("runs uncaptured", what),
                Cost("runs uncaptured", p.uncaptured_runs if i == 0 else 0, what, None, fix,
                     link(topic), "fallback", (name,)),
            ))
    for b in p.not_padded[:1]:  # the first op that forbids padding stands for the piece
        f = b.finding
        out.append((
            ("not padded", f.source_line or f.op),
            Cost("not padded", p.calls, f"captured once per exact size: {b}",
                 short_source(f.source_line), wording.not_padded_fix(f.source_line),
                 link("not_padded"),
                 "padding", (name,), captures=p.misses),
        ))
    return out


# -- the text ---------------------------------------------------------------------------------


def render_summary(report: ExplainReport) -> list[str]:
    s = summarize(report)
    if not s.dynamo_graphs:
        lines = ["hpuopt: nothing compiled"]
    else:
        runtime = "/".join(s.runtimes) or "no"
        per_graph = " + ".join(str(g.calls or 0) for g in report.graphs)
        each = f" ({per_graph})" if len(report.graphs) > 1 else ""
        lines = [f"hpuopt: {plural(s.dynamo_graphs, 'Dynamo graph')} on the {runtime} runtime, "
                 f"called {plural(s.calls, 'time')}{each}"]
        lines.extend(_numbers(s, report.scope))
    if s.dynamo:
        lines.append("Dynamo:")
        for n in s.dynamo:
            lines.extend(_wrap(f"- {n.what}", 2, 4))
            if n.source:
                lines.append(f"      at {n.source}")
            if n.fix:
                lines.extend(_wrap("what to do: " + n.fix + (f" ({n.link})" if n.link else ""), 6))
    if s.costs:
        lines.append("What cost the most (by calls affected):")
        for i, cost in enumerate(s.costs[:TOP], 1):
            lines.extend(_cost_lines(i, cost))
        if len(s.costs) > TOP:
            lines.append(f"  ... {plural(len(s.costs) - TOP, 'more reason')} in the details below")
    elif s.dynamo_graphs:
        lines.append("Every piece is captured and nothing blocks padding.")
    return lines


def _numbers(s: Summary, scope: str) -> list[str]:
    process = " (whole process)" if scope == "model" else ""
    direct = s.runtimes == ("direct",)  # compiled pieces called directly: nothing is held
    held = (f"{plural(s.device_graphs, 'compiled key')} in "
            f"{plural(s.captured_pieces, 'compiled piece')}" if direct else
            f"{plural(s.device_graphs, 'device graph')}, {nbytes(s.held_bytes)}, in "
            f"{plural(s.captured_pieces, 'captured piece')}")
    lines = [
        f"  held:       {held}"
        + (f"; {s.evictions} evicted by max_graphs / max_graph_bytes ({link('memory')})"
           if s.evictions else ""),
        f"  {'called:   ' if direct else 'replayed: '}  {s.replays} of {s.piece_runs} piece runs"
        + (f" ({s.replays / s.piece_runs:.0%})" if s.piece_runs else ""),
    ]
    parts = []
    if s.dynamic_pieces:
        parts.append(f"{s.uncaptured_runs - s.fallback_runs} of pieces that run as is")
    if s.fallback_runs or s.dynamic_pieces:
        parts.append(f"{s.fallback_runs} of captured pieces falling back")
    detail = f" ({', '.join(parts)})" if s.uncaptured_runs else ""
    lines.append(f"  uncaptured: {s.uncaptured_runs} piece runs{detail}")
    if s.padded_pieces or s.exact_pieces:
        pad = []
        if s.padded_pieces:
            pad.append(f"{plural(s.padded_pieces, 'piece pads', 'pieces pad')} to buckets")
        if s.exact_pieces:
            pad.append(f"{plural(s.exact_pieces, 'piece')} captured per exact size instead")
        if s.pad_waste is not None:
            pad.append(f"{s.pad_waste:.0%} of padded input elements were padding{process}")
        lines.append(f"  padding:    {'; '.join(pad)}")
    lines.append(f"  compile:    {s.compile_seconds:.2f}s in hpuopt (passes, AOTAutograd, runners)")
    if s.stale_outputs:
        lines.append(
            f"  stale:      {plural(s.stale_outputs, 'output')} overwritten while still referenced "
            f"(clone_outputs=False){process} ({link('stale')})"
        )
    if "cpu" in s.runtimes:
        lines.append(
            "  note:       the CPU runtime emulates device graphs: a replay re-runs every op, so "
            "it saves no time on a CPU; for speed there use runtime='direct' (Inductor pieces) "
            f"({link('slower')})"
        )
    return lines


def _cost_lines(i: int, c: Cost) -> list[str]:
    counts = plural(c.calls, "call")
    if c.kind == "not padded":
        counts += f", {plural(c.captures, 'capture')}"
    lines = _wrap(f"{i}. {c.kind} ({counts}): {c.what}", 2, 5)
    if c.source:
        lines.append(f"       at {c.source}")
    lines.extend(_wrap(f"what to do: {c.fix} ({c.link})", 7))
    return lines


def _wrap(text: str, indent: int, hang: int = 2, width: int = 100) -> list[str]:
    """``text`` wrapped at ``width``, its first line indented by ``indent``, the others by
    ``hang`` more."""
    pad = " " * indent
    return textwrap.wrap(
        text, width, initial_indent=pad, subsequent_indent=pad + " " * hang,
        break_long_words=False, break_on_hyphens=False,
    )
