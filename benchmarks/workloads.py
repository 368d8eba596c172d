"""Three host-bound workloads against eager, Inductor, CUDA Graphs by hand and hpugraph.

Scenarios (inference, ``torch.no_grad()``, float32; details in ``benchmarks/README.md``):

    W1  an MLP (``--blocks`` x Linear + GELU + LayerNorm) at batch 1, 4 and 16, static shapes;
        one table per batch size.
    W2  a decode-like loop: ``--steps`` calls with a batch size drawn from 1..``--max-batch``,
        ``dynamic=True`` (hpugraph pads to buckets); times per step.
    W3  static MLP -> ``h[h.norm(dim=-1) > thr]`` -> static MLP -> ``.sum()``, inputs rotating
        over ``--w3-sets`` sets so the number of selected rows changes from call to call.

Rows: eager, inductor, and on CUDA reduce-overhead, cudagraphs and a hand-written
``torch.cuda.graph`` capture; hpugraph; W1 also hpugraph no-clone, W3 also hpuopt.compile. Per
row: timings (``harness``), graphs captured and memory held (hpuopt's ``explain``; on CUDA the
allocator's deltas and ``CUDAGraph.capture_begin`` calls), and max |diff| against eager.

    python benchmarks/workloads.py                  # full run: results/workloads-<device>.json
    python benchmarks/workloads.py --quick              # smoke run, writes nothing
    python benchmarks/workloads.py --workloads W1 W3 --skip-inductor
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import harness
import torch
from harness import Goal, Row, fmt_bytes

# hpuopt from this checkout: importing harness put it first on sys.path
import hpuopt
from hpuopt.diagnostics.explain import Session, default_session, explain

# Goals (printed, never asserted).
GOAL_W1_VS_EAGER = 3.0  # GPU: hpugraph at batch 1 at least this many times faster than eager
GOAL_W1_VS_HAND = 1.10  # GPU: hpugraph at most this many times the hand-written capture's time
GOAL_W3_VS_RO = 1.3  # GPU: hpugraph at least this many times faster than reduce-overhead
GOAL_W2_MEM_VS_HAND = 1.10  # GPU: hpugraph graph memory at most this many times hand-written

CUDA_ONLY = ("reduce-overhead", "cudagraphs", "hand-written")


class CaptureCounter:
    """Counts ``torch.cuda.CUDAGraph.capture_begin`` calls (hand-written, hpuopt, cudagraph
    trees and the cudagraphs backend all go through it): torch's class, wrapped on CUDA only."""

    def __init__(self) -> None:
        self.count = 0
        cls = getattr(torch.cuda, "CUDAGraph", None) if torch.cuda.is_available() else None
        original = getattr(cls, "capture_begin", None)
        self.active = original is not None
        if not self.active:
            return
        counter = self

        def capture_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.count += 1
            return original(self, *args, **kwargs)

        cls.capture_begin = capture_begin  # type: ignore[union-attr]

    def since(self, start: int) -> int | None:
        return self.count - start if self.active else None


def _mem(device: str) -> dict[str, int]:
    if device != "cuda":
        return {}
    torch.cuda.synchronize()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "max_allocated": torch.cuda.max_memory_allocated()}


# -- models and inputs ------------------------------------------------------------------------


class MaskedTwoHalves(torch.nn.Module):
    """W3: static MLP (ending in a Linear, so row norms vary) -> rows whose norm exceeds
    ``thr`` -> static MLP -> sum."""

    def __init__(self, blocks: int, hidden: int, seed: int) -> None:
        super().__init__()
        self.first = harness.make_mlp(blocks, hidden, seed).append(
            torch.nn.Linear(hidden, hidden))
        self.second = torch.nn.Sequential(*[harness.Block(hidden) for _ in range(blocks)])
        self.thr = 0.0  # set from calibration inputs (about half the rows pass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        h = h[h.norm(dim=-1) > self.thr]
        return self.second(h).sum()


def _randn(gen: torch.Generator, shape: Sequence[int], device: str) -> torch.Tensor:
    # drawn on the CPU so the inputs are the same on every device
    return torch.randn(*shape, generator=gen).to(device)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# -- rows -------------------------------------------------------------------------------------


def compiled_row(name: str, model: torch.nn.Module, kind: str = "", api: bool = False,
                 **kwargs: Any) -> Row:
    """A row whose build compiles its own copy of ``model`` (``hpuopt.compile`` with ``api``)."""
    row = Row(name, kind="hpuopt" if api else kind)

    def build() -> Any:
        m = copy.deepcopy(model)
        row.compiled = hpuopt.compile(m, **kwargs) if api else torch.compile(m, **kwargs)
        return row.compiled

    row.build = build
    return row


def standard_rows(model: torch.nn.Module, device: str, args: argparse.Namespace,
                  dynamic: bool | None, hand: Callable[[torch.nn.Module], Any] | None
                  ) -> list[Row]:
    """eager, inductor, reduce-overhead, cudagraphs, hand-written, hpugraph. Each ``build``
    returns a *model-like* callable; :func:`bind_inputs` turns it into the row's call."""
    skip = "skipped (--skip-inductor)"
    rows = [Row("eager", build=lambda: model),
            Row("inductor", status=skip) if args.skip_inductor
            else compiled_row("inductor", model, dynamic=dynamic)]
    if device != "cuda":
        rows += [Row(name, status="n/a (no CUDA)") for name in CUDA_ONLY]
    else:
        rows += [Row("reduce-overhead", status=skip) if args.skip_inductor
                 else compiled_row("reduce-overhead", model, mode="reduce-overhead",
                                   dynamic=dynamic),
                 # the cudagraphs backend fails on symbolic sizes: one graph per size instead
                 compiled_row("cudagraphs", model, backend="cudagraphs", dynamic=False),
                 Row("hand-written", build=(lambda: hand_row(hand, model)) if hand else None,
                     status="ok" if hand else "n/a")]
    rows.append(compiled_row("hpugraph", model, kind="hpugraph", backend="hpugraph",
                             dynamic=dynamic))
    return rows


def hand_row(hand: Callable[[torch.nn.Module], Any], model: torch.nn.Module) -> Any:
    """A hand-written row's call on its own copy of the model. The call holds the copy: its graphs
    read the copy's parameters by address, and a freed copy's memory goes to other tensors."""
    own = copy.deepcopy(model)
    call = hand(own)
    call.model = own
    return call


def bind_inputs(rows: Sequence[Row], xs: Sequence[torch.Tensor],
                expected: Sequence[torch.Tensor], one_pass: bool = False) -> None:
    """Makes each row's build return its call: the model on ``xs[0]`` when there is one input,
    on the next input in turn otherwise, or (``one_pass``) on every input in order. Its check
    is the largest absolute difference from ``expected`` over all inputs."""
    models: dict[str, Callable[[torch.Tensor], Any]] = {}
    for row in rows:
        build = row.build
        if build is None:
            continue

        def built(row: Row = row, build: Callable[[], Any] = build) -> Callable[[], Any]:
            m = models[row.name] = build()
            if one_pass:
                def each() -> None:
                    for x in xs:
                        m(x)

                return each
            if len(xs) == 1:
                return functools.partial(m, xs[0])
            it = itertools.cycle(xs)
            return lambda: m(next(it))

        def check(row: Row = row) -> float:
            m = models[row.name]
            return max((m(x) - e).abs().max().item() for x, e in zip(xs, expected))

        row.build, row.check = built, check


# -- timing, checks and reports ---------------------------------------------------------------


@contextlib.contextmanager
def bookkeeping(row: Row, device: str, counter: CaptureCounter) -> Iterator[None]:
    """Around a row's set-up: memory, captures and hpuopt records made in it are the row's."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mem0, cap0 = _mem(device), counter.count
    hpu0, sess0 = hpuopt.counters.snapshot(), len(default_session.graphs)
    yield
    mem1, delta = _mem(device), hpuopt.counters.delta(hpu0)
    row.info.update(first_call_s=row.first_call_s, warmup_s=row.warmup_s,
                    cuda_graph_captures=counter.since(cap0),
                    hpuopt_graphs_captured=int(delta["graphs_captured"]),
                    hpuopt_capture_s=delta["capture_seconds"])
    if row.kind == "hpugraph":
        row.info["session_graphs"] = default_session.graphs[sess0:]
    if mem0:
        row.info.update(alloc_delta=mem1["allocated"] - mem0["allocated"],
                        reserved_delta=mem1["reserved"] - mem0["reserved"],
                        peak_delta=mem1["max_allocated"] - mem0["allocated"])
    if row.status == "ok":
        print(f"  [{row.name}] set up in {row.first_call_s:.2f}s", flush=True)


def run_rows(rows: list[Row], device: str, counter: CaptureCounter, *, warmup: int,
             repeats: int, number: int, divisor: int = 1) -> dict[str, harness.Timing]:
    """``harness.time_rows`` with each row's set-up booked to it, and what was compiled or
    captured while the rows were timed."""
    live = harness.set_up(rows, warmup=warmup, device=device,
                          setup=lambda r: bookkeeping(r, device, counter))
    frames0, cap0, hpu0 = harness.dynamo_frames(), counter.count, hpuopt.counters.snapshot()
    timings = harness.measure(live, repeats=repeats, number=number, divisor=divisor,
                              device=device)
    hd = hpuopt.counters.delta(hpu0)
    during = {"dynamo_frames": harness.dynamo_frames() - frames0,
              "cuda_graph_captures": counter.since(cap0),
              "hpuopt_graphs_captured": int(hd["graphs_captured"]),
              "hpuopt_recaptures": int(hd["recaptures"]),
              "hpuopt_fallbacks": int(hd["fallbacks"])}
    for row in live:
        row.info["during_timing_all_rows"] = during
    return timings


def check_rows(rows: list[Row]) -> None:
    """Runs each live row's check alone: max |row - eager|, and hpuopt's counters over it."""
    for row in rows:
        if row.fn is None or row.check is None or row.status != "ok":
            continue
        before = hpuopt.counters.snapshot()
        try:
            row.info["max_abs_diff"] = float(row.check())
        except Exception as exc:  # noqa: BLE001 - reported in the row's notes
            row.info["max_abs_diff"] = float("nan")
            row.info["check_error"] = f"{type(exc).__name__}: {exc}"
        d = hpuopt.counters.delta(before)
        real, pad = d["real_elements"], d["padded_elements"]
        row.info["check_counters"] = {
            **{k: int(d[k]) for k in ("replays", "graphs_captured", "fallbacks",
                                      "uncaptured_runs", "real_elements", "padded_elements")},
            "pad_waste": pad / (real + pad) if real + pad else 0.0}


def hpuopt_info(rows: list[Row]) -> None:
    """Each hpuopt row's own explain report: graphs cached, memory held, pieces."""
    for row in rows:
        graphs = row.info.pop("session_graphs", None)
        if row.kind == "hpuopt" and row.compiled is not None:
            rep = row.compiled.explain()
        elif graphs is not None:
            session = Session()
            session.graphs = list(graphs)
            rep = explain(session)
        else:
            continue
        captured = [p for p in rep.pieces if p.captured]
        row.info["explain"] = str(rep).split("\ncounters:")[0]
        row.info["graphs"] = sum(len(p.graphs) for p in captured)
        row.info["held_bytes"] = sum(p.held_bytes for p in captured)
        row.info["pieces"] = [
            {"name": p.name, "captured": p.captured, "graphs": list(p.graphs),
             "held_bytes": p.held_bytes, "padding": p.padding, "fallbacks": list(p.fallbacks),
             "replays": p.replays, "hits": p.hits, "misses": p.misses}
            for p in rep.pieces]


def columns(device: str) -> list[harness.Column]:
    def graphs(r: Row) -> str:
        return str(r.info["graphs"]) if "graphs" in r.info else str(
            r.info.get("cuda_graph_captures") or "-")

    def diff(r: Row) -> str:
        d = r.info.get("max_abs_diff")
        return "-" if d is None else f"{d:.1e}"

    cols: list[harness.Column] = [("graphs", 7, graphs),
                                  ("held", 8, lambda r: fmt_bytes(r.info.get("held_bytes")))]
    if device == "cuda":
        cols += [(head, 8, lambda r, k=key: fmt_bytes(r.info.get(k))) for head, key in
                 (("Δalloc", "alloc_delta"), ("Δresv", "reserved_delta"), ("peak", "peak_delta"))]
    return [*cols, ("max|diff|", 11, diff)]


def notes_of(rows: list[Row], timings: dict[str, harness.Timing], buckets: int | None = None
             ) -> list[str]:
    """Things worth a look in hpuopt rows (and any timed recompiles)."""
    notes = []
    for r in (r for r in rows if r.name in timings):
        cc = r.info.get("check_counters", {})
        if r.kind in ("hpugraph", "hpuopt"):
            if cc.get("fallbacks") or cc.get("uncaptured_runs"):
                notes.append(f"{r.name}: {cc.get('fallbacks')} fallbacks, "
                             f"{cc.get('uncaptured_runs')} uncaptured runs in the check pass")
            if buckets is not None and r.info.get("graphs", 0) > buckets:
                notes.append(f"{r.name}: {r.info['graphs']} graphs for {buckets} buckets")
            notes += [f"{r.name}: piece {p['name']} runs at exact shapes ({len(p['graphs'])} "
                      f"graphs): {p['padding'][:160]}" for p in r.info.get("pieces", [])
                      if p["captured"] and p["padding"].startswith("exact shapes")]
            if cc.get("graphs_captured"):
                notes.append(f"{r.name}: captured {cc['graphs_captured']} graph(s) during the "
                             "check pass (after timing)")
        diff = r.info.get("max_abs_diff")
        if diff is not None and not diff <= 1e-3:
            notes.append(f"{r.name}: max |diff| from eager {diff:.3g}")
    during = next((r.info.get("during_timing_all_rows") for r in rows if r.name in timings), {})
    if any(during.get(k) for k in ("dynamo_frames", "hpuopt_graphs_captured",
                                   "hpuopt_recaptures", "cuda_graph_captures")):
        notes.append(f"compiles/captures while timing (all rows): {during}")
    for n in notes:
        print(f"  note: {n}")
    return notes


def run_workload(rows: list[Row], device: str, counter: CaptureCounter, title: str, *,
                 unit: str = "call", buckets: int | None = None, **timing: Any
                 ) -> tuple[dict[str, harness.Timing], dict[str, Any]]:
    """Times, checks and reports one table; returns its timings and its JSON entry."""
    timings = run_rows(rows, device, counter, **timing)
    check_rows(rows)
    hpuopt_info(rows)
    print(harness.format_table(timings, "eager", title, rows=rows, speedup=True,
                               columns=columns(device), unit=unit))
    return timings, {"rows": harness.rows_json(timings, "eager", rows, speedup=True)}


def vs_eager(timings: dict[str, harness.Timing], names: Sequence[str], where: str = "") -> None:
    for name in names:
        s = harness.speedup(timings, name, "eager")
        if s is not None:
            print(f"  {name} vs eager{where}: {s:.2f}x faster (wall)")


def cuda_capture(fn: Callable[[torch.Tensor], Any], inp: torch.Tensor, pool: Any = None,
                 side: Any = None) -> tuple[Any, Any]:
    """The hand-written rows' capture: three warm-up runs of ``fn(inp)`` on a side stream, then
    one CUDA graph of it (in ``pool`` when given). Returns the graph and its static output."""
    side = torch.cuda.Stream() if side is None else side
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(inp)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(inp)
    return graph, out


# -- W1 ---------------------------------------------------------------------------------------


def hand_w1(model: torch.nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """One CUDA graph for this batch size: static input in, static output out (not cloned)."""
    static_x = x.clone()
    graph, static_y = cuda_capture(model, static_x)

    def call(inp: torch.Tensor) -> torch.Tensor:
        static_x.copy_(inp)
        graph.replay()
        return static_y

    return call


def workload_w1(args: argparse.Namespace, device: str, counter: CaptureCounter) -> dict[str, Any]:
    model = harness.make_mlp(args.blocks, args.hidden, seed=1).to(device).eval()
    gen = torch.Generator().manual_seed(11)
    out: dict[str, Any] = {"model": f"{args.blocks} x (Linear({args.hidden}) + GELU + "
                                    f"LayerNorm)", "batches": {}}
    goals: list[Goal] = []
    for batch in args.w1_batches:
        torch._dynamo.reset()
        hpuopt.reset()
        x = _randn(gen, (batch, args.hidden), device)
        rows = standard_rows(model, device, args, dynamic=False,
                             hand=lambda m, x=x: hand_w1(m, x))
        rows.append(compiled_row("hpugraph no-clone", model, kind="hpugraph",
                                 backend="hpugraph", dynamic=False,
                                 options={"clone_outputs": False}))
        bind_inputs(rows, [x], [model(x).clone()])
        print(f"\nW1 batch {batch}: setting up rows", flush=True)
        timings, entry = run_workload(rows, device, counter, f"W1 batch {batch} (per call)",
                                      warmup=args.warmup, repeats=args.repeats,
                                      number=args.number)
        names = ("hpugraph", "hpugraph no-clone")
        if device == "cuda" and batch == 1:
            for name in names:
                goals += [Goal(f"W1 b=1 {name} >= {GOAL_W1_VS_EAGER}x eager",
                               harness.speedup(timings, name, "eager"), ">=", GOAL_W1_VS_EAGER),
                          Goal(f"W1 b=1 {name} time <= {GOAL_W1_VS_HAND}x hand-written",
                               harness.speedup(timings, "hand-written", name), "<=",
                               GOAL_W1_VS_HAND)]
        else:
            vs_eager(timings, names, f" at batch {batch}")
        entry["notes"] = notes_of(rows, timings)
        out["batches"][str(batch)] = entry
    out["goals"] = harness.report_goals(goals, "  ")
    return out


# -- W2 ---------------------------------------------------------------------------------------


def hand_w2(model: torch.nn.Module, buckets: Sequence[int], hidden: int, device: str
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """One CUDA graph per bucket, all in one pool, largest bucket captured first."""
    pool, side = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    static_in: dict[int, torch.Tensor] = {}
    static_out: dict[int, torch.Tensor] = {}
    graphs: dict[int, Any] = {}
    for b in sorted(buckets, reverse=True):
        static_in[b] = torch.zeros(b, hidden, device=device)
        graphs[b], static_out[b] = cuda_capture(model, static_in[b], pool, side)
    torch.cuda.synchronize()

    def step(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = next_pow2(n)
        static_in[b][:n].copy_(x)  # rows are independent: the pad rows' content is irrelevant
        graphs[b].replay()
        return static_out[b][:n]

    return step


def w2_goals(rows: list[Row], buckets: list[int]) -> list[Goal]:
    info = {r.name: r.info for r in rows}
    hp, hand = info.get("hpugraph", {}), info.get("hand-written", {})
    goals = [Goal(f"W2 hpugraph graphs <= buckets ({len(buckets)})", hp.get("graphs"), "<=",
                  len(buckets))]
    for key in ("reserved_delta", "alloc_delta"):
        a, b = hp.get(key), hand.get(key)
        goals.append(Goal(f"W2 hpugraph {key} <= {GOAL_W2_MEM_VS_HAND}x hand-written",
                          a / b if a is not None and b else None, "<=", GOAL_W2_MEM_VS_HAND))
    return goals


def workload_w2(args: argparse.Namespace, device: str, counter: CaptureCounter) -> dict[str, Any]:
    torch._dynamo.reset()
    hpuopt.reset()
    model = harness.make_mlp(args.w2_blocks, args.hidden, seed=2).to(device).eval()
    rng = random.Random(args.seed)
    sizes = [rng.randint(1, args.max_batch) for _ in range(args.steps)]
    gen = torch.Generator().manual_seed(22)
    xs = [_randn(gen, (n, args.hidden), device) for n in sizes]
    buckets = sorted({next_pow2(n) for n in sizes})
    rows = standard_rows(model, device, args, dynamic=True,
                         hand=lambda m: hand_w2(m, buckets, args.hidden, device))
    bind_inputs(rows, xs, [model(x).clone() for x in xs], one_pass=True)
    print(f"\nW2: {args.steps} steps, batch 1..{args.max_batch} "
          f"({len(set(sizes))} distinct sizes, buckets {buckets}); setting up rows", flush=True)
    timings, entry = run_workload(
        rows, device, counter, "W2 decode loop (per step; 'first' = first pass over all steps)",
        unit="step", warmup=args.w2_warmup, repeats=args.w2_repeats, number=1, divisor=len(xs))
    for r in rows:
        if r.kind == "hpugraph" and r.name in timings:
            waste = r.info.get("check_counters", {}).get("pad_waste", 0)
            print(f"  {r.name}: {r.info.get('graphs')} graphs for {len(buckets)} buckets, "
                  f"held {fmt_bytes(r.info.get('held_bytes'))}, pad waste {waste:.1%} of "
                  "padded inputs' elements")
    if device != "cuda":
        vs_eager(timings, ["hpugraph"])
    goals = w2_goals(rows, buckets) if device == "cuda" else []
    return {"model": f"{args.w2_blocks} x (Linear({args.hidden}) + GELU + LayerNorm), "
                     "dynamic=True", "sizes": sizes, "buckets": buckets, **entry,
            "goals": harness.report_goals(goals, "  "),
            "notes": notes_of(rows, timings, buckets=len(buckets))}


# -- W3 ---------------------------------------------------------------------------------------


def hand_w3(model: MaskedTwoHalves, x0: torch.Tensor, hidden: int, device: str
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The first half captured at the input's shape; the selection eager; the second half
    captured per power-of-two bucket of selected rows (one pool), output sliced, sum eager."""
    pool, side = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    static_x = x0.clone()
    g1, static_h = cuda_capture(model.first, static_x, pool, side)
    second: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    for b in sorted({next_pow2(n) for n in range(1, x0.shape[0] + 1)}, reverse=True):
        inp = torch.zeros(b, hidden, device=device)
        second[b] = (*cuda_capture(model.second, inp, pool, side), inp)
    torch.cuda.synchronize()
    thr = model.thr

    def call(x: torch.Tensor) -> torch.Tensor:
        static_x.copy_(x)
        g1.replay()
        h = static_h[static_h.norm(dim=-1) > thr]
        n = h.shape[0]
        if n == 0:
            return torch.zeros((), device=device)
        g, out, inp = second[next_pow2(n)]
        inp[:n].copy_(h)
        g.replay()
        return out[:n].sum()

    return call


def workload_w3(args: argparse.Namespace, device: str, counter: CaptureCounter) -> dict[str, Any]:
    torch._dynamo.reset()
    hpuopt.reset()
    model = MaskedTwoHalves(args.w3_blocks, args.hidden, seed=3).to(device).eval()
    gen = torch.Generator().manual_seed(33)
    xs = [_randn(gen, (args.w3_batch, args.hidden), device) for _ in range(args.w3_sets)]
    model.thr = float(torch.cat([model.first(x).norm(dim=-1) for x in xs]).median())
    selected = [int((model.first(x).norm(dim=-1) > model.thr).sum()) for x in xs]
    rows = standard_rows(model, device, args, dynamic=None,
                         hand=lambda m: hand_w3(m, xs[0], args.hidden, device))
    rows.append(compiled_row("hpuopt.compile", model, api=True))
    bind_inputs(rows, xs, [model(x).clone() for x in xs])
    print(f"\nW3: batch {args.w3_batch}, {args.w3_sets} input sets, rows selected per set "
          f"{selected} (thr {model.thr:.3f}); setting up rows", flush=True)
    timings, entry = run_workload(
        rows, device, counter, "W3 static -> mask -> static -> sum (per call)",
        warmup=max(args.warmup, 2 * len(xs)), repeats=args.repeats,
        number=max(len(xs), args.number // len(xs) * len(xs)))
    names = ("hpugraph", "hpuopt.compile")
    goals = [Goal(f"W3 {name} >= {GOAL_W3_VS_RO}x reduce-overhead",
                  harness.speedup(timings, name, "reduce-overhead"), ">=", GOAL_W3_VS_RO)
             for name in names] if device == "cuda" else []
    if device != "cuda":
        vs_eager(timings, names)
    return {"model": f"{args.w3_blocks} blocks + Linear -> h[h.norm(-1) > thr] -> "
                     f"{args.w3_blocks} blocks -> sum, hidden {args.hidden}",
            "batch": args.w3_batch, "selected_rows_per_set": selected, "threshold": model.thr,
            **entry, "goals": harness.report_goals(goals, "  "), "notes": notes_of(rows, timings)}


# -- main -------------------------------------------------------------------------------------

WORKLOADS = {"W1": workload_w1, "W2": workload_w2, "W3": workload_w3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__, name="workloads", warmup=20, repeats=15, number=50,
                       number_help="calls per repeat (W1, W3)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--skip-inductor", action="store_true",
                   help="skip the inductor and reduce-overhead rows (slow to compile on CPU)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--blocks", type=int, default=8, help="W1 blocks")
    p.add_argument("--w1-batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--w2-blocks", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="W2's batch-size sequence")
    p.add_argument("--w2-warmup", type=int, default=2, help="W2 warm-up passes")
    p.add_argument("--w2-repeats", type=int, default=9, help="W2 timed passes")
    p.add_argument("--w3-blocks", type=int, default=4)
    p.add_argument("--w3-batch", type=int, default=32)
    p.add_argument("--w3-sets", type=int, default=8)
    args = p.parse_args(argv)
    harness.quick(p, args, warmup=3, repeats=3, number=8, steps=30, w2_warmup=1, w2_repeats=3)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    harness.raise_dynamo_limits()
    machine = harness.start(args, device)
    counter = CaptureCounter()
    print(f"workloads {' '.join(args.workloads)} on {device}"
          f"{' (' + machine.get('device_name', '') + ')' if device == 'cuda' else ''}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {machine['cpu_model']}",
          flush=True)
    started = time.perf_counter()
    result = harness.result_header("workloads", args, machine)
    result["goals"] = {
        "gpu": {"W1_b1_speedup_vs_eager_min": GOAL_W1_VS_EAGER,
                "W1_b1_time_vs_hand_written_max": GOAL_W1_VS_HAND,
                "W3_speedup_vs_reduce_overhead_min": GOAL_W3_VS_RO,
                "W2_graphs_max": "number of buckets",
                "W2_memory_vs_hand_written_max": GOAL_W2_MEM_VS_HAND},
        "cpu": "ratios against eager are printed; no thresholds"}
    with torch.no_grad():
        for name in args.workloads:
            result[name] = WORKLOADS[name](args, device, counter)
    harness.finish(result, args, device, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
