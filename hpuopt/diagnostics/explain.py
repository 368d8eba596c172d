"""What hpuopt did to each graph, as data and as text.

Every Dynamo graph the backend compiles gets a :class:`GraphRecord` in a :class:`Session`; each
of its ATen graphs (forward, backward, inference) lists its pieces with the live state of their
graph caches. :func:`explain` turns a session into an :class:`ExplainReport` — dataclasses all the
way down, with ``str(report)`` for people: first a summary a user can act on
(:mod:`hpuopt.diagnostics.summary`), then the details per graph and piece, in the user's terms
(:mod:`hpuopt.diagnostics.wording`, :mod:`hpuopt.diagnostics.sizes`). What Dynamo did before
hpuopt saw a graph (graph breaks, a model it compiled nothing of) comes from
:mod:`hpuopt.diagnostics.dynamo`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from hpuopt.diagnostics import dynamo, wording
from hpuopt.diagnostics.counters import Counters, counters
from hpuopt.diagnostics.sizes import SizeNames
from hpuopt.diagnostics.summary import Summary, render_summary, summarize
from hpuopt.records import Finding, PieceInfo, PiecePadding, SplitReason, UnsafeReason, skipped

log = logging.getLogger(__name__)


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
        self.dynamo_mark = dynamo.Mark()
        """Where Dynamo's graph-break records stood when this session started."""

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
        """Drops every captured graph and forgets the records (and Dynamo's breaks so far)."""
        self.release_graphs()
        self.graphs.clear()
        self.dynamo_mark.reset()


default_session = Session()


# -- the report -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PaddingBlocker:
    """Why a varying size of a piece is not padded to buckets: the op's finding from
    ``bucket_plan`` and that size as the user knows it (``x dim 0``), when it can be named."""

    finding: UnsafeReason
    size: str | None = None

    def __str__(self) -> str:
        return wording.describe_unsafe(self.finding.op, self.finding.why, self.size)


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
    copies_in: int = 0
    """Tensors copied into static input buffers, over all replays (``inputs_copied`` each)."""
    outputs_lent: int = 0
    """Outputs handed out without a clone over all calls: activations saved for backward and
    gradients (lent with liveness), or all escaping ones under ``clone_outputs=False``."""
    outputs_cloned: int = 0
    """Outputs cloned as they were handed out, over all calls (they reach the caller)."""
    lent_copied: int = 0
    """Lent outputs still alive when the piece was about to overwrite them, so copied out."""
    calls: int = 0
    """Calls of this piece: lookups in its graph cache (hits + misses) for a captured piece; the
    calls of its ATen graph for a piece that runs as is."""
    uncaptured_runs: int = 0
    """Calls that ran the piece's ops one by one: every call of a piece that runs as is; for a
    captured piece, the calls of signatures that fell back (calls less replays)."""
    padded: tuple[str, ...] = ()
    """The sizes this piece pads to buckets, in the user's terms (``x dim 0``)."""
    not_padded: tuple[PaddingBlocker, ...] = ()
    """Why the piece's other varying sizes are captured exactly, one per op that forbids it."""
    direct: bool = False
    """Called directly (``runtime="direct"``, Gaudi's compile mode): compiled per key and run on
    the caller's tensors, no graph captured, nothing copied or cloned."""

    @property
    def has_uncaptured_keys(self) -> bool:
        return bool(self.fallbacks) or any(k.endswith("(uncaptured)") for k in self.graphs)


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
    calls: int | None = 0
    """Calls of this graph (the most calls of any captured piece); None when it has no
    captured piece to count them."""
    compile_seconds: float = 0.0
    dynamic_inputs: tuple[str, ...] = ()
    """Input sizes that vary between calls, in the user's terms (``x dim 0``)."""


@dataclasses.dataclass(frozen=True)
class GraphReport:
    index: int
    num_nodes: int
    aot_graphs: tuple[AotGraphReport, ...]
    rewrites: tuple[str, ...] = ()
    """The pre-AOT passes that changed this graph (``fused_adam``, ``fused_clip_norm``...)."""
    findings: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    """Each pre-AOT pass's findings: rewrites done and candidates skipped, with reasons."""
    compile_seconds: float = 0.0
    """Wall time of hpuopt's backend call for this graph (passes, AOTAutograd, runners)."""

    @property
    def calls(self) -> int | None:
        """Calls of this Dynamo graph: of its forward or inference graph."""
        firsts = [a for a in self.aot_graphs if a.kind != "backward"] or list(self.aot_graphs)
        counts = [a.calls for a in firsts if a.calls is not None]
        return max(counts) if counts else None

    @property
    def dynamic_inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d for a in self.aot_graphs for d in a.dynamic_inputs))


@dataclasses.dataclass(frozen=True)
class ExplainReport:
    graphs: tuple[GraphReport, ...]
    counters: Counters
    dynamo: tuple[dynamo.DynamoNote, ...] = ()
    """What Dynamo did before hpuopt saw a graph: graph breaks, a model it compiled nothing of,
    recompiles."""
    scope: str = "process"
    """``"process"`` for ``hpuopt.explain()``, ``"model"`` for a model's own report (the
    counters are process-wide either way)."""

    @property
    def pieces(self) -> list[PieceReport]:
        return [p for g in self.graphs for a in g.aot_graphs for p in a.pieces]

    @property
    def splits(self) -> list[SplitReason]:
        return [r for p in self.pieces for r in p.reasons]

    @property
    def summary(self) -> Summary:
        """The numbers and the reasons, ranked by calls affected, that the text opens with."""
        return summarize(self)

    def __str__(self) -> str:
        return render(self)


def explain(session: Session | None = None) -> ExplainReport:
    """The report of ``session`` (the process-wide one by default)."""
    scope = "process" if session is None or session is default_session else "model"
    session = default_session if session is None else session
    graphs = tuple(_graph_report(g) for g in list(session.graphs))
    try:
        notes = dynamo.notes(session.dynamo_mark.breaks_since(), len(graphs))
        notes += dynamo.recompile_notes(graphs, notes)
    except Exception:  # noqa: BLE001 - explain() never raises over Dynamo's internals
        log.debug("no Dynamo notes", exc_info=True)
        notes = ()
    return ExplainReport(graphs, counters.snapshot(), notes, scope)


def _graph_report(g: GraphRecord) -> GraphReport:
    aots = []
    for a in g.aot_graphs:
        names = SizeNames(a.module)
        padding = {
            f.piece: f.plan
            for f in a.findings.get("bucket_plan", ())
            if isinstance(f, PiecePadding)
        }
        pieces = [_piece_report(p, padding.get(p.info.name), names) for p in a.pieces]
        counted = [p.calls for p in pieces if p.captured]
        calls = max(counted) if counted else None
        runs = calls or 0  # a piece that runs as is runs on every call of its graph
        pieces = [
            p if p.captured else dataclasses.replace(p, calls=runs, uncaptured_runs=runs)
            for p in pieces
        ]
        steps = tuple(m.reason for m in a.findings.get("mark_step", ()))
        rewrites = tuple(n for n, f in a.findings.items() if _rewrote(f) and a.passes.get(n))
        kept = tuple(
            f"{f.pass_name}: {f.reason}"
            for found in a.findings.values()
            for f in skipped(found)
            if f.pass_name != "bucket_plan"  # shown per piece, with its padding
        )
        aots.append(AotGraphReport(
            a.kind, a.runtime, tuple(pieces), dict(a.passes), steps, rewrites, kept,
            calls=calls, compile_seconds=a.compile_seconds, dynamic_inputs=names.dynamic_inputs(),
        ))
    rewrites = tuple(name for name, changed in g.pre_aot.items() if changed)
    return GraphReport(
        g.index, g.num_nodes, tuple(aots), rewrites, dict(g.findings), g.backend_seconds
    )


# post-AOT passes that change a graph without rewriting its ops: not listed as rewrites
_STRUCTURAL = frozenset({"split", "bucket_plan", "mark_step", "cleanup"})


def _rewrote(findings: tuple[Any, ...]) -> bool:
    """Whether these findings record an op rewrite (a pass other than the structural ones)."""
    return any(
        isinstance(f, Finding) and f.applied and f.pass_name not in _STRUCTURAL for f in findings
    )


def _piece_report(p: PieceRecord, plan: Any, names: SizeNames) -> PieceReport:
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
    padded: tuple[str, ...] = ()
    blockers: tuple[PaddingBlocker, ...] = ()
    if plan is not None:
        name = p.info.name
        padded = tuple(
            names.piece_input_dim(name, s.input, s.dim) or str(s) for s in plan.padded
        )
        blockers = tuple(
            PaddingBlocker(u, names.piece_input_dim(name, u.sources[0].input, u.sources[0].dim)
                           if u.sources else None)
            for u in plan.reasons
        )
    report = PieceReport(
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
        copies_in=r.inputs_copied_total,
        outputs_lent=r.outputs_lent,
        outputs_cloned=r.outputs_cloned,
        lent_copied=r.lent_copied,
        calls=r.hits + r.misses,
        padded=padded,
        not_padded=blockers,
        direct=getattr(r, "direct", False),
    )
    if report.has_uncaptured_keys:
        report = dataclasses.replace(report, uncaptured_runs=max(0, report.calls - report.replays))
    return report


# -- the text ---------------------------------------------------------------------------------


def render(report: ExplainReport) -> str:
    """The summary, then the details of every graph and piece, then the process's counters."""
    try:
        lines = render_summary(report)
    except Exception:  # noqa: BLE001 - a report that cannot summarise still shows its details
        log.debug("no summary", exc_info=True)
        lines = [f"hpuopt: {wording.plural(len(report.graphs), 'Dynamo graph')}"]
    if report.graphs:
        lines.append("")
        lines.append("Details:")
    for g in report.graphs:
        lines.extend(_render_graph(g))
    c = report.counters
    lines.append(
        f"counters (whole process): captured {c.graphs_captured}, replays {c.replays}, "
        f"hits {c.cache_hits}, misses {c.cache_misses}, evictions {c.evictions}, "
        f"recaptures {c.recaptures}, promotions {c.promotions}, fallbacks {c.fallbacks}, "
        f"static copies {c.static_copies}, clones {c.output_clones}, lent {c.outputs_lent} "
        f"({c.lent_copies} copied out), capture {c.capture_seconds:.3f}s"
        + (f", pad waste {c.pad_waste:.0%}" if c.real_elements else "")
    )
    return "\n".join(lines)


def _render_graph(g: GraphReport) -> list[str]:
    calls = "" if g.calls is None else f", {wording.plural(g.calls, 'call')}"
    varies = (
        f"; varying sizes: {', '.join(g.dynamic_inputs)}" if g.dynamic_inputs
        else "; compiled for fixed sizes"
    )
    lines = [f"graph {g.index}: {g.num_nodes} nodes{calls}{varies}"]
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
            lines.extend(_render_captured(p) if p.captured else _render_as_is(p))
        if a.mark_steps and a.runtime == "hpu":  # lazy-mode boundaries do nothing elsewhere
            lines.append(f"    mark_step: {'; '.join(a.mark_steps)}")
    return lines


def _render_captured(p: PieceReport) -> list[str]:
    if p.direct:  # compiled per key, called on the caller's tensors: no buffers to describe
        lines = [
            (f"    [compiled] {p.name}: {wording.plural(p.num_nodes, 'op')}; "
             f"{wording.describe_keys(p.graphs).replace('graph', 'compiled key')}; "
             f"calls {p.replays}, hits {p.hits}, misses {p.misses}, evictions {p.evictions}"),
            "        inputs and outputs: the caller's tensors, nothing copied or cloned",
        ]
    else:
        lines = [
            (f"    [graph] {p.name}: {wording.plural(p.num_nodes, 'op')}; "
             f"{wording.describe_keys(p.graphs)}; "
             f"replays {p.replays}, hits {p.hits}, misses {p.misses}, evictions {p.evictions}, "
             f"{wording.nbytes(p.held_bytes)}"),
            f"        inputs: {p.inputs_in_place} read in place, {p.inputs_copied} copied per call",
            _render_outputs(p),
        ]
    if p.padded:
        policy = p.padding.split(" to ", 1)[1] if " to " in p.padding else "buckets"
        lines.append(f"        pads {', '.join(p.padded)} to {policy}")
    elif p.padding.startswith("pads"):
        lines.append(f"        {p.padding}")
    for b in p.not_padded:
        lines.append(f"        not padded, one graph per size: {b}")
        if b.finding.source_line:
            lines.append(f"          at {wording.short_source(b.finding.source_line)}")
    if not p.not_padded and p.padding.startswith("exact shapes"):
        lines.append(f"        {p.padding}")
    for reason in dict.fromkeys(p.fallbacks):
        lines.append(f"        runs uncaptured for some inputs: {reason}")
    return lines


def _render_outputs(p: PieceReport) -> str:
    """What the piece handed out per call: lent (no copy) and cloned, and the lent ones that
    were copied out because they were still alive at a later replay."""
    calls = max(p.calls, 1)
    line = (f"        outputs: {p.outputs_lent / calls:.3g} lent, "
            f"{p.outputs_cloned / calls:.3g} cloned per call")
    if p.lent_copied:
        line += (f"; {wording.plural(p.lent_copied, 'lent output')} copied out, still alive "
                 "when a later call overwrote them")
    return line


def _render_as_is(p: PieceReport) -> list[str]:
    main = [r for r in p.reasons if r.reason != "host_scalar"]
    if not main:
        return [f"    [as is] {p.name}: shape arithmetic on the host ({p.num_nodes} nodes)"]
    ops = ", ".join(dict.fromkeys(wording.short_op(r.op) for r in main))
    host = len(p.reasons) - len(main)
    extra = " and shape arithmetic on the host" if host else ""
    lines = [f"    [as is] {p.name}: {ops}{extra}"]
    groups: dict[str | None, list[SplitReason]] = {}
    for r in main:
        groups.setdefault(r.source, []).append(r)
    for source, rs in groups.items():
        for r in rs:
            lines.append(f"        {r.reason}: {wording.describe_split(r)}")
        if source:
            lines.append(f"          at {wording.short_source(source)}")
    return lines
