"""What hpuopt did to each graph, as data and as text.

Every Dynamo graph the backend compiles gets a :class:`GraphRecord` in a :class:`Session`; each
of its ATen graphs (forward, backward, inference) lists its pieces with the live state of their
graph caches. :func:`explain` turns a session into an :class:`ExplainReport` — dataclasses all the
way down, with ``str(report)`` for people.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from hpuopt.diagnostics.counters import Counters, counters
from hpuopt.records import Finding, PieceInfo, SplitReason, skipped


@dataclasses.dataclass
class PieceRecord:
    info: PieceInfo
    runner: Any = None  # the PieceRunner of a static piece, None for a dynamic one


@dataclasses.dataclass
class AotGraphRecord:
    kind: str  # "forward" | "backward" | "inference"
    runtime: str
    pieces: list[PieceRecord]
    passes: dict[str, bool] = dataclasses.field(default_factory=dict)
    """Pass name -> whether it modified the graph."""
    findings: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Pass name -> wall time of that pass on this graph."""
    compile_seconds: float = 0.0
    """Wall time of compiling this ATen graph: its passes and setting up its runners."""
    module: Any = None
    """The stitching ``GraphModule`` that runs this graph's pieces (for tools and benchmarks)."""


@dataclasses.dataclass
class GraphRecord:
    index: int
    num_nodes: int
    aot_graphs: list[AotGraphRecord] = dataclasses.field(default_factory=list)
    pre_aot: dict[str, bool] = dataclasses.field(default_factory=dict)
    findings: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Pre-AOT pass name -> wall time of that pass."""
    backend_seconds: float = 0.0
    """Wall time of the backend call: pre-AOT passes, AOTAutograd and compiling the graphs it
    produced then (a backward graph is compiled later, on the first backward)."""


class Session:
    """The records of one compiled model (``hpuopt.compile``) or of the process (plain
    ``torch.compile(backend="hpugraph")``)."""

    def __init__(self) -> None:
        self.graphs: list[GraphRecord] = []
        self._lock = threading.Lock()

    def new_graph(self, num_nodes: int) -> GraphRecord:
        with self._lock:
            record = GraphRecord(index=len(self.graphs), num_nodes=num_nodes)
            self.graphs.append(record)
            return record

    def discard(self, record: GraphRecord) -> None:
        with self._lock:
            if record in self.graphs:
                self.graphs.remove(record)

    def release_graphs(self) -> None:
        """Drops every captured graph; the pieces capture again on demand, records stay."""
        for g in self.graphs:
            for a in g.aot_graphs:
                for p in a.pieces:
                    if p.runner is not None:
                        p.runner.clear()

    def clear(self) -> None:
        """Drops every captured graph and forgets the records."""
        self.release_graphs()
        self.graphs.clear()


default_session = Session()


# -- the report -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PieceReport:
    name: str
    captured: bool
    """Static piece (captured per signature) or dynamic piece (runs as is)."""
    num_nodes: int
    ops: tuple[str, ...]
    reasons: tuple[SplitReason, ...]
    graphs: tuple[str, ...] = ()
    """The cached signatures, most recently used last."""
    fallbacks: tuple[str, ...] = ()
    replays: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    held_bytes: int = 0
    padding: str = ""
    """What the piece pads to buckets, or why it is captured at exact shapes."""
    inputs_copied: int = 0
    """Tensor inputs copied into static buffers each call."""
    inputs_in_place: int = 0
    """Tensor inputs read where the caller keeps them (parameters, buffers, and inputs whose
    address never changed), their address checked each call."""


@dataclasses.dataclass(frozen=True)
class AotGraphReport:
    kind: str
    runtime: str
    pieces: tuple[PieceReport, ...]
    passes: dict[str, bool]
    """Pass name -> whether it changed the graph."""
    mark_steps: tuple[str, ...] = ()
    """Why each mark_step boundary was inserted."""
    rewrites: tuple[str, ...] = ()
    """The post-AOT rewrites that changed this graph (``reinplace``, ``clip_scale``, ...)."""
    kept: tuple[str, ...] = ()
    """Why a post-AOT rewrite left a candidate alone ("clip_scale: <reason>")."""


@dataclasses.dataclass(frozen=True)
class GraphReport:
    index: int
    num_nodes: int
    aot_graphs: tuple[AotGraphReport, ...]
    rewrites: tuple[str, ...] = ()
    """The pre-AOT passes that changed this graph (``fused_adam``, ``fused_clip_norm``...)."""
    findings: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    """Each pre-AOT pass's findings: rewrites done and candidates skipped, with reasons."""


@dataclasses.dataclass(frozen=True)
class ExplainReport:
    graphs: tuple[GraphReport, ...]
    counters: Counters

    @property
    def pieces(self) -> list[PieceReport]:
        return [p for g in self.graphs for a in g.aot_graphs for p in a.pieces]

    @property
    def splits(self) -> list[SplitReason]:
        return [r for p in self.pieces for r in p.reasons]

    def __str__(self) -> str:
        return render(self)


def explain(session: Session | None = None) -> ExplainReport:
    """The report of ``session`` (the process-wide one by default)."""
    session = default_session if session is None else session
    graphs = []
    for g in session.graphs:
        aots = []
        for a in g.aot_graphs:
            pieces = tuple(_piece_report(p) for p in a.pieces)
            steps = tuple(m.reason for m in a.findings.get("mark_step", ()))
            rewrites = tuple(n for n, f in a.findings.items() if _rewrote(f) and a.passes.get(n))
            kept = tuple(
                f"{f.pass_name}: {f.reason}"
                for found in a.findings.values()
                for f in skipped(found)
                if f.pass_name != "bucket_plan"  # shown per piece, with its padding
            )
            aots.append(
                AotGraphReport(a.kind, a.runtime, pieces, dict(a.passes), steps, rewrites, kept)
            )
        rewrites = tuple(name for name, changed in g.pre_aot.items() if changed)
        graphs.append(GraphReport(g.index, g.num_nodes, tuple(aots), rewrites, dict(g.findings)))
    return ExplainReport(tuple(graphs), counters.snapshot())


# post-AOT passes that change a graph without rewriting its ops: not listed as rewrites
_STRUCTURAL = frozenset({"split", "bucket_plan", "mark_step", "cleanup"})


def _rewrote(findings: tuple[Any, ...]) -> bool:
    """Whether these findings record an op rewrite (a pass other than the structural ones)."""
    return any(
        isinstance(f, Finding) and f.applied and f.pass_name not in _STRUCTURAL for f in findings
    )


def _piece_report(p: PieceRecord) -> PieceReport:
    r = p.runner
    base = dict(
        name=p.info.name,
        captured=p.info.static,
        num_nodes=len(p.info.nodes),
        ops=p.info.ops,
        reasons=p.info.reasons,
    )
    if r is None:
        return PieceReport(**base)
    return PieceReport(
        **base,
        graphs=tuple(r.describe_keys()),
        fallbacks=tuple(r.fallback_reasons.values()),
        replays=r.replays,
        hits=r.hits,
        misses=r.misses,
        evictions=r.evictions,
        held_bytes=r.held_bytes(),
        padding=r.padding_summary(),
        inputs_copied=len(r.roles.copied),
        inputs_in_place=len(r.roles.stable),
    )


def render(report: ExplainReport) -> str:
    lines = [f"hpuopt: {len(report.graphs)} Dynamo graph(s)"]
    for g in report.graphs:
        lines.append(f"graph {g.index}: {g.num_nodes} nodes")
        if g.rewrites:
            lines.append(f"  rewritten by: {', '.join(g.rewrites)}")
        for found in g.findings.values():
            for f in skipped(found):
                lines.append(f"  {f.pass_name} skipped: {f.reason} (node {f.node})")
        for a in g.aot_graphs:
            static = sum(p.captured for p in a.pieces)
            lines.append(
                f"  {a.kind} ({a.runtime} runtime): {len(a.pieces)} piece(s), "
                f"{static} captured, {len(a.pieces) - static} run as is"
            )
            if a.rewrites:
                lines.append(f"    rewritten by: {', '.join(a.rewrites)}")
            for why in a.kept:
                lines.append(f"    left alone by {why}")
            for p in a.pieces:
                if p.captured:
                    lines.append(
                        f"    [graph] {p.name}: {p.num_nodes} ops; {len(p.graphs)} graph(s) "
                        f"{', '.join(p.graphs) or '-'}; replays {p.replays}, hits {p.hits}, "
                        f"misses {p.misses}, evictions {p.evictions}, {_bytes(p.held_bytes)}"
                    )
                    lines.append(
                        f"        inputs: {p.inputs_in_place} read in place, "
                        f"{p.inputs_copied} copied per call"
                    )
                    if p.padding:
                        lines.append(f"        {p.padding}")
                    for reason in dict.fromkeys(p.fallbacks):
                        lines.append(f"        runs uncaptured for some inputs: {reason}")
                else:
                    lines.append(f"    [as is] {p.name}: {', '.join(_short(o) for o in p.ops)}")
                    lines.extend(_grouped_reasons(p.reasons))
            if a.mark_steps:
                lines.append(f"    mark_step: {'; '.join(a.mark_steps)}")
    c = report.counters
    lines.append(
        f"counters: captured {c.graphs_captured}, replays {c.replays}, hits {c.cache_hits}, "
        f"misses {c.cache_misses}, evictions {c.evictions}, recaptures {c.recaptures}, "
        f"promotions {c.promotions}, "
        f"fallbacks {c.fallbacks}, capture {c.capture_seconds:.3f}s"
        + (f", pad waste {c.pad_waste:.0%}" if c.real_elements else "")
    )
    return "\n".join(lines)


def _grouped_reasons(reasons: tuple[SplitReason, ...]) -> list[str]:
    """One line per user source line: its first reason in full, the host-side helper nodes
    that came with it (size reads, asserts) summed up."""
    groups: dict[str | None, list[SplitReason]] = {}
    for r in reasons:
        groups.setdefault(r.source, []).append(r)
    lines = []
    for source, rs in groups.items():
        main = next((r for r in rs if r.reason != "host_scalar"), rs[0])
        lines.append(f"        {main.node} ({_short(main.op)}): {main.reason}: {main.detail}")
        others = [r for r in rs if r is not main]
        if others:
            ops = ", ".join(dict.fromkeys(_short(r.op) for r in others))
            lines.append(f"          with {len(others)} host-side node(s): {ops}")
        if source:
            lines.append(f"          at {source}")
    return lines


def _short(op: str) -> str:
    return op.replace("aten.", "").replace(".default", "")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
