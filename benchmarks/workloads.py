"""Three host-bound workloads against eager, Inductor, CUDA Graphs by hand and hpugraph.

Workloads (inference, ``torch.no_grad()``, float32):

    W1  an MLP of ``--blocks`` blocks of Linear + GELU + LayerNorm (``--hidden`` wide) at batch
        1, 4 and 16, static shapes (``dynamic=False``); one table per batch size.
    W2  a decode-like loop: the same kind of MLP called ``--steps`` times with a batch size that
        varies 1..``--max-batch`` each step (a fixed random sequence, seeded); compiled with
        ``dynamic=True`` so hpugraph pads to buckets (powers of two by default). One call of a
        row is one pass over the whole sequence; times are reported per step.
    W3  a static MLP, a data-dependent row selection ``h = h[h.norm(dim=-1) > thr]`` and a
        second static MLP followed by ``.sum()``; the inputs rotate over ``--w3-sets`` sets so
        the number of selected rows changes from call to call.

Rows, all measured in the same run and interleaved round by round (``_common`` conventions):

    eager              the module itself
    inductor           torch.compile (default backend)
    reduce-overhead    torch.compile(mode="reduce-overhead")           CUDA only
    cudagraphs         torch.compile(backend="cudagraphs")              CUDA only
    hand-written       torch.cuda.graph capture written by hand         CUDA only
                       W1: one graph per batch size, static input/output;
                       W2: one graph per power-of-two bucket, one pool (graph_pool_handle),
                           inputs padded, outputs sliced;
                       W3: each static half captured (the second per bucket), mask eager.
    hpugraph           torch.compile(backend="hpugraph")
    hpugraph no-clone  W1 only: options={"clone_outputs": False} (returns the graph's buffers,
                       like the hand-written capture does)
    hpuopt.compile     W3 only: hpuopt.compile(model) keeps the dynamic op inside the graph

Per row: per-call median over repeats and its IQR (wall, and CPU time of the process), the
first call timed apart (``torch.compile``: tracing, compilation and the first captures; the
hand-written rows: warm-up and capture), the number of device graphs captured (hpuopt's
counters and ``explain``; on CUDA every ``CUDAGraph.capture_begin`` is counted, whoever calls
it), graph memory (``explain().held_bytes``; on CUDA also the allocator's allocated/reserved
deltas and peak over the row's set-up), and the largest absolute difference from eager on the
same inputs, checked after timing.

On CUDA every timed block of calls is bracketed by ``torch.cuda.synchronize()`` (device work is
asynchronous; the host clock is read only after the device is done), so a row's time is the
throughput of back-to-back calls, host and device together.

    python benchmarks/workloads.py                  # full run: results/workloads-<device>.json
    python benchmarks/workloads.py --quick              # smoke run, writes nothing
    python benchmarks/workloads.py --workloads W1 W3 --skip-inductor
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import random
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT.parent))  # hpuopt from this checkout when it is not installed

import _common  # noqa: E402

import hpuopt  # noqa: E402
from hpuopt.diagnostics.explain import Session, default_session  # noqa: E402
from hpuopt.diagnostics.explain import explain as explain_session  # noqa: E402

# Goals (printed, never asserted).
GOAL_W1_VS_EAGER = 3.0  # GPU: hpugraph at batch 1 at least this many times faster than eager
GOAL_W1_VS_HAND = 1.10  # GPU: hpugraph at most this many times the hand-written capture's time
GOAL_W3_VS_RO = 1.3  # GPU: hpugraph at least this many times faster than reduce-overhead
GOAL_W2_MEM_VS_HAND = 1.10  # GPU: hpugraph graph memory at most this many times hand-written

CUDA_ONLY = ("reduce-overhead", "cudagraphs", "hand-written")


# -- environment ------------------------------------------------------------------------------


def _ensure_backend() -> None:
    """Registers ``hpugraph`` when the package is not installed (no entry point), e.g. when the
    script runs from a plain checkout on another machine."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "hpugraph" not in list_backends(exclude_tags=()):
        register_backend(compiler_fn=hpuopt.hpugraph_backend, name="hpugraph")


def _raise_dynamo_limits() -> None:
    """Every compiled copy of a model shares its ``forward`` code object, so its cache entries
    add up on one frame; the default limit (8) would silently send later rows to eager."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 256)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = 4096


class CaptureCounter:
    """Counts ``torch.cuda.CUDAGraph.capture_begin`` calls (hand-written, hpuopt, cudagraph
    trees and the cudagraphs backend all go through it). A no-op without CUDA."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        if not torch.cuda.is_available():
            return
        cls = getattr(torch.cuda, "CUDAGraph", None)
        original = getattr(cls, "capture_begin", None)
        if cls is None or original is None:
            return
        counter = self

        def capture_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.count += 1
            return original(self, *args, **kwargs)

        cls.capture_begin = capture_begin
        self.active = True


def _dynamo_frames() -> int:
    from torch._dynamo.utils import counters as dynamo_counters

    return sum(dynamo_counters["frames"].values())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _mem(device: str) -> dict[str, int]:
    if device != "cuda":
        return {}
    torch.cuda.synchronize()
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "max_allocated": torch.cuda.max_memory_allocated(),
    }


# -- models -----------------------------------------------------------------------------------


Block = _common.Block


def make_mlp(blocks: int, hidden: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[Block(hidden) for _ in range(blocks)])


class MaskedTwoHalves(torch.nn.Module):
    """W3: static MLP (ending in a Linear, so row norms vary) -> rows whose norm exceeds
    ``thr`` -> static MLP -> sum."""

    def __init__(self, blocks: int, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.first = torch.nn.Sequential(
            *[Block(hidden) for _ in range(blocks)], torch.nn.Linear(hidden, hidden)
        )
        self.second = torch.nn.Sequential(*[Block(hidden) for _ in range(blocks)])
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


@dataclasses.dataclass
class Row:
    """A row to time: ``build()`` returns a zero-argument callable (one "call" of the row) or
    raises; ``check()`` (optional) returns the largest absolute difference from eager."""

    name: str
    build: Callable[[], Callable[[], Any]] | None
    status: str = "ok"  # or why the row did not run
    kind: str = ""  # "hpugraph" rows get explain/counters; "hpuopt" rows have own sessions
    compiled: Any = None  # the compiled model, when there is one
    fn: Callable[[], Any] | None = None
    check: Callable[[], float] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _compile_row(name: str, model: torch.nn.Module, kind: str = "", **kwargs: Any) -> Row:
    row = Row(name, None, kind=kind)

    def build() -> Any:
        row.compiled = torch.compile(copy.deepcopy(model), **kwargs)
        return row.compiled

    row.build = build
    return row


def _hpuopt_row(name: str, model: torch.nn.Module, **options: Any) -> Row:
    row = Row(name, None, kind="hpuopt")

    def build() -> Any:
        row.compiled = hpuopt.compile(copy.deepcopy(model), **options)
        return row.compiled

    row.build = build
    return row


def standard_rows(
    model: torch.nn.Module,
    device: str,
    args: argparse.Namespace,
    dynamic: bool,
    hand: Callable[[torch.nn.Module], Any] | None,
) -> list[Row]:
    """eager, inductor, reduce-overhead, cudagraphs, hand-written, hpugraph. Each ``build`` of
    a compiled row returns a *model-like* callable; the workload wraps it into its call."""
    rows = [Row("eager", lambda: model)]
    skip = "skipped (--skip-inductor)"
    rows.append(
        Row("inductor", None, status=skip)
        if args.skip_inductor
        else _compile_row("inductor", model, dynamic=dynamic)
    )
    if device != "cuda":
        for name in CUDA_ONLY:
            rows.append(Row(name, None, status="n/a (no CUDA)"))
    else:
        rows.append(
            Row("reduce-overhead", None, status=skip)
            if args.skip_inductor
            else _compile_row("reduce-overhead", model, mode="reduce-overhead", dynamic=dynamic)
        )
        rows.append(_compile_row("cudagraphs", model, backend="cudagraphs", dynamic=dynamic))
        rows.append(
            Row("hand-written", (lambda: hand(copy.deepcopy(model))) if hand else None,
                status="ok" if hand else "n/a")
        )
    rows.append(_compile_row("hpugraph", model, kind="hpugraph", backend="hpugraph",
                             dynamic=dynamic))
    return rows


# -- timing -----------------------------------------------------------------------------------


def run_rows(
    rows: list[Row],
    device: str,
    *,
    warmup: int,
    repeats: int,
    number: int,
    per_call_divisor: int = 1,
    counter: CaptureCounter,
) -> dict[str, _common.Timing]:
    """``_common.time_rows`` with set-up bookkeeping and device synchronisation.

    Set-up of each row (build, first call, warm-up) runs alone, so memory deltas, captures and
    hpuopt records made in it belong to that row. Then ``repeats`` rounds, rows interleaved;
    each block of ``number`` calls is bracketed by synchronisations on CUDA. Times are divided
    by ``number * per_call_divisor`` (W2: per step of the sequence).
    """
    live = []
    for row in rows:
        if row.status != "ok" or row.build is None:
            continue
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        mem0 = _mem(device)
        cap0 = counter.count
        hpu0 = hpuopt.counters.snapshot()
        sess0 = len(default_session.graphs)
        start = time.perf_counter_ns()
        try:
            row.fn = row.build()
            _sync(device)
            built = time.perf_counter_ns()
            row.fn()
            _sync(device)
            first = time.perf_counter_ns()
            for _ in range(warmup):
                row.fn()
            _sync(device)
            warm = time.perf_counter_ns()
        except Exception as exc:  # a row that fails is reported, the others still run
            row.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            row.info["traceback"] = traceback.format_exc(limit=8)
            print(f"  [{row.name}] {row.status}", flush=True)
            continue
        mem1 = _mem(device)
        delta = hpuopt.counters.delta(hpu0)
        row.info.update(
            build_s=(built - start) / 1e9,
            first_call_s=(first - start) / 1e9,
            warmup_s=(warm - first) / 1e9,
            cuda_graph_captures=(counter.count - cap0) if counter.active else None,
            hpuopt_graphs_captured=int(delta["graphs_captured"]),
            hpuopt_capture_s=delta["capture_seconds"],
        )
        if row.kind == "hpugraph":
            row.info["session_graphs"] = default_session.graphs[sess0:]
        if device == "cuda":
            row.info.update(
                alloc_delta=mem1["allocated"] - mem0["allocated"],
                reserved_delta=mem1["reserved"] - mem0["reserved"],
                peak_delta=mem1["max_allocated"] - mem0["allocated"],
            )
        live.append(row)
        print(f"  [{row.name}] set up in {row.info['first_call_s']:.2f}s", flush=True)

    wall: dict[str, list[float]] = {r.name: [] for r in live}
    cpu: dict[str, list[float]] = {r.name: [] for r in live}
    frames0, cap0, hpu0 = _dynamo_frames(), counter.count, hpuopt.counters.snapshot()
    div = number * per_call_divisor
    for _ in range(repeats):
        for row in live:
            fn = row.fn
            assert fn is not None
            _sync(device)
            w0, c0 = time.perf_counter_ns(), time.process_time_ns()
            for _ in range(number):
                fn()
            _sync(device)
            c1, w1 = time.process_time_ns(), time.perf_counter_ns()
            wall[row.name].append((w1 - w0) / 1e9 / div)
            cpu[row.name].append((c1 - c0) / 1e9 / div)
    hd = hpuopt.counters.delta(hpu0)
    during = {
        "dynamo_frames": _dynamo_frames() - frames0,
        "cuda_graph_captures": (counter.count - cap0) if counter.active else None,
        "hpuopt_graphs_captured": int(hd["graphs_captured"]),
        "hpuopt_recaptures": int(hd["recaptures"]),
        "hpuopt_fallbacks": int(hd["fallbacks"]),
    }
    for row in live:
        row.info["during_timing_all_rows"] = during
    return {
        r.name: _common.Timing(
            r.name, r.info["first_call_s"], warmup, r.info["warmup_s"], repeats, number,
            wall[r.name], cpu[r.name],
        )
        for r in live
    }


def check_rows(rows: list[Row]) -> None:
    """Runs each live row's check alone: max |row - eager|, and hpuopt's counters over it."""
    for row in rows:
        if row.fn is None or row.check is None or row.status != "ok":
            continue
        before = hpuopt.counters.snapshot()
        try:
            row.info["max_abs_diff"] = float(row.check())
        except Exception as exc:
            row.info["max_abs_diff"] = float("nan")
            row.info["check_error"] = f"{type(exc).__name__}: {exc}"
        d = hpuopt.counters.delta(before)
        real, pad = d["real_elements"], d["padded_elements"]
        row.info["check_counters"] = {
            "replays": int(d["replays"]),
            "graphs_captured": int(d["graphs_captured"]),
            "fallbacks": int(d["fallbacks"]),
            "uncaptured_runs": int(d["uncaptured_runs"]),
            "real_elements": int(real),
            "padded_elements": int(pad),
            "pad_waste": pad / (real + pad) if real + pad else 0.0,
        }


def hpuopt_report(row: Row) -> Any:
    """The explain report of this row alone, or None for a row that is not hpuopt's."""
    if row.kind == "hpuopt" and row.compiled is not None:
        return row.compiled.explain()
    if row.kind == "hpugraph" and "session_graphs" in row.info:
        s = Session()
        s.graphs = list(row.info["session_graphs"])
        return explain_session(s)
    return None


def finish_hpuopt_info(rows: list[Row]) -> None:
    for row in rows:
        rep = hpuopt_report(row)
        row.info.pop("session_graphs", None)
        if rep is None:
            continue
        pieces = [p for p in rep.pieces if p.captured]
        row.info["explain"] = str(rep).split("\ncounters:")[0]
        row.info["graphs"] = sum(len(p.graphs) for p in pieces)
        row.info["held_bytes"] = sum(p.held_bytes for p in pieces)
        row.info["pieces"] = [
            {"name": p.name, "captured": p.captured, "graphs": list(p.graphs),
             "held_bytes": p.held_bytes, "padding": p.padding, "fallbacks": list(p.fallbacks),
             "replays": p.replays, "hits": p.hits, "misses": p.misses}
            for p in rep.pieces
        ]


# -- output -----------------------------------------------------------------------------------


def _fmt_b(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _graphs(row: Row) -> str:
    if "graphs" in row.info:
        return str(row.info["graphs"])
    n = row.info.get("cuda_graph_captures")
    return "-" if not n else str(n)


def format_rows(rows: list[Row], timings: dict[str, _common.Timing], device: str,
                title: str, unit: str = "call") -> str:
    base = timings.get("eager")
    w = max(len(r.name) for r in rows) + 2
    head = (f"{'row':<{w}}{unit + ' med':>10}{'IQR':>8}{'cpu med':>9}{'x eager':>8}{'x cpu':>8}"
            f"{'first':>9}{'graphs':>7}{'held':>8}")
    if device == "cuda":
        head += f"{'Δalloc':>8}{'Δresv':>8}{'peak':>8}"
    head += f"{'max|diff|':>11}"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        t = timings.get(r.name)
        if t is None:
            lines.append(f"{r.name:<{w}}{r.status}")
            continue
        speed = base.median_s / t.median_s if base else float("nan")
        cspeed = base.cpu_median_s / t.cpu_median_s if base else float("nan")
        diff = r.info.get("max_abs_diff")
        line = (f"{r.name:<{w}}{_common._fmt_s(t.median_s):>10}{_common._fmt_s(t.iqr_s):>8}"
                f"{_common._fmt_s(t.cpu_median_s):>9}{speed:>7.2f}x{cspeed:>7.2f}x"
                f"{_common._fmt_s(t.first_call_s):>9}{_graphs(r):>7}"
                f"{_fmt_b(r.info.get('held_bytes')):>8}")
        if device == "cuda":
            line += (f"{_fmt_b(r.info.get('alloc_delta')):>8}"
                     f"{_fmt_b(r.info.get('reserved_delta')):>8}"
                     f"{_fmt_b(r.info.get('peak_delta')):>8}")
        line += f"{'-' if diff is None else f'{diff:.1e}':>11}"
        lines.append(line)
    if base:
        lines.append(f"(wall medians over {base.repeats} repeats of {base.number} calls; "
                     "'x eager'/'x cpu' = eager wall/CPU time over the row's; "
                     "'first' = build + first call)")
    return "\n".join(lines)


def rows_payload(rows: list[Row], timings: dict[str, _common.Timing]) -> list[dict[str, Any]]:
    out = []
    base = timings.get("eager")
    for r in rows:
        item: dict[str, Any] = {"name": r.name, "status": r.status}
        t = timings.get(r.name)
        if t is not None:
            item.update(t.summary())
            if base:
                item["speedup_vs_eager_wall"] = base.median_s / t.median_s
                item["speedup_vs_eager_cpu"] = base.cpu_median_s / t.cpu_median_s
        item["info"] = {k: v for k, v in r.info.items()}
        out.append(item)
    return out


def _speed(timings: dict[str, _common.Timing], a: str, b: str) -> float | None:
    """How many times faster row ``a`` is than row ``b`` (wall medians), or None."""
    if a in timings and b in timings:
        return timings[b].median_s / timings[a].median_s
    return None


def _goal_line(text: str, value: float | None, ok: bool | None) -> dict[str, Any]:
    verdict = "n/a" if value is None else ("met" if ok else "NOT met")
    shown = "-" if value is None else f"{value:.2f}"
    print(f"  goal: {text}: {shown} -> {verdict}")
    return {"goal": text, "value": value, "met": None if value is None else bool(ok)}


def suspicious(rows: list[Row], timings: dict[str, _common.Timing], buckets: int | None = None
               ) -> list[str]:
    """Things worth a look in hpuopt rows (and any timed recompiles)."""
    notes = []
    for r in rows:
        if r.name not in timings:
            continue
        cc = r.info.get("check_counters", {})
        if r.kind in ("hpugraph", "hpuopt"):
            if cc.get("fallbacks") or cc.get("uncaptured_runs"):
                notes.append(f"{r.name}: {cc.get('fallbacks')} fallbacks, "
                             f"{cc.get('uncaptured_runs')} uncaptured runs in the check pass")
            if buckets is not None and r.info.get("graphs", 0) > buckets:
                notes.append(f"{r.name}: {r.info['graphs']} graphs for {buckets} buckets")
            for p in r.info.get("pieces", []):
                if p["captured"] and p["padding"].startswith("exact shapes"):
                    notes.append(f"{r.name}: piece {p['name']} runs at exact shapes "
                                 f"({len(p['graphs'])} graphs): {p['padding'][:160]}")
            if cc.get("graphs_captured"):
                notes.append(f"{r.name}: captured {cc['graphs_captured']} graph(s) during the "
                             "check pass (after timing)")
        diff = r.info.get("max_abs_diff")
        if diff is not None and not diff <= 1e-3:
            notes.append(f"{r.name}: max |diff| from eager {diff:.3g}")
    during = next((r.info.get("during_timing_all_rows") for r in rows if r.name in timings), None)
    if during and (during["dynamo_frames"] or during["hpuopt_graphs_captured"]
                   or during["hpuopt_recaptures"] or during["cuda_graph_captures"]):
        notes.append(f"compiles/captures while timing (all rows): {during}")
    for n in notes:
        print(f"  note: {n}")
    return notes


def _bind_input(build: Callable[[], Any], x: torch.Tensor) -> Callable[[], Callable[[], Any]]:
    """A build returning ``model(x)``-style callables -> one returning a zero-argument call."""

    def bound() -> Callable[[], Any]:
        m = build()
        return lambda: m(x)

    return bound


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
    model = make_mlp(args.blocks, args.hidden, seed=1).to(device).eval()
    gen = torch.Generator().manual_seed(11)
    out: dict[str, Any] = {"model": f"{args.blocks} x (Linear({args.hidden}) + GELU + "
                                    f"LayerNorm)", "batches": {}}
    goals = []
    for batch in args.w1_batches:
        torch._dynamo.reset()
        hpuopt.reset()
        x = _randn(gen, (batch, args.hidden), device)
        expected = model(x).clone()
        rows = standard_rows(model, device, args, dynamic=False,
                             hand=lambda m, x=x: hand_w1(m, x))
        rows.append(_compile_row("hpugraph no-clone", model, kind="hpugraph", backend="hpugraph",
                                 dynamic=False, options={"clone_outputs": False}))
        for r in rows:
            if r.build is not None:
                r.build = _bind_input(r.build, x)
        for r in rows:
            r.check = (lambda r=r: (r.fn() - expected).abs().max().item())
        print(f"\nW1 batch {batch}: setting up rows", flush=True)
        timings = run_rows(rows, device, warmup=args.warmup, repeats=args.repeats,
                           number=args.number, counter=counter)
        check_rows(rows)
        finish_hpuopt_info(rows)
        print(format_rows(rows, timings, device, f"W1 batch {batch} (per call)"))
        entry: dict[str, Any] = {"rows": rows_payload(rows, timings)}
        for name in ("hpugraph", "hpugraph no-clone"):
            s = _speed(timings, name, "eager")
            if device == "cuda" and batch == 1:
                goals.append(_goal_line(f"W1 b=1 {name} >= {GOAL_W1_VS_EAGER}x eager", s,
                                        s is not None and s >= GOAL_W1_VS_EAGER))
                h = _speed(timings, "hand-written", name)  # row time / hand-written time
                goals.append(_goal_line(f"W1 b=1 {name} time <= {GOAL_W1_VS_HAND}x hand-written",
                                        h, h is not None and h <= GOAL_W1_VS_HAND))
            elif s is not None:
                print(f"  {name} vs eager at batch {batch}: {s:.2f}x faster (wall)")
        entry["notes"] = suspicious(rows, timings)
        out["batches"][str(batch)] = entry
    out["goals"] = goals
    return out


# -- W2 ---------------------------------------------------------------------------------------


def hand_w2(model: torch.nn.Module, buckets: Sequence[int], hidden: int, device: str
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """One CUDA graph per bucket, all in one pool, largest bucket captured first."""
    pool = torch.cuda.graph_pool_handle()
    static_in: dict[int, torch.Tensor] = {}
    static_out: dict[int, torch.Tensor] = {}
    graphs: dict[int, Any] = {}
    side = torch.cuda.Stream()
    for b in sorted(buckets, reverse=True):
        xb = torch.zeros(b, hidden, device=device)
        graphs[b], static_out[b] = cuda_capture(model, xb, pool, side)
        static_in[b] = xb
    torch.cuda.synchronize()

    def step(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = next_pow2(n)
        static_in[b][:n].copy_(x)  # rows are independent: the pad rows' content is irrelevant
        graphs[b].replay()
        return static_out[b][:n]

    return step


def workload_w2(args: argparse.Namespace, device: str, counter: CaptureCounter) -> dict[str, Any]:
    torch._dynamo.reset()
    hpuopt.reset()
    model = make_mlp(args.w2_blocks, args.hidden, seed=2).to(device).eval()
    rng = random.Random(args.seed)
    sizes = [rng.randint(1, args.max_batch) for _ in range(args.steps)]
    gen = torch.Generator().manual_seed(22)
    xs = [_randn(gen, (n, args.hidden), device) for n in sizes]
    buckets = sorted({next_pow2(n) for n in sizes})
    expected = [model(x).clone() for x in xs]

    rows = standard_rows(
        model, device, args, dynamic=True,
        hand=lambda m: hand_w2(m, buckets, args.hidden, device),
    )
    step_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def wrap(r: Row) -> None:
        build = r.build
        if build is None:
            return

        def built() -> Callable[[], None]:
            step = build()
            step_fns[r.name] = step

            def one_pass() -> None:
                for x in xs:
                    step(x)

            return one_pass

        r.build = built
        def check() -> float:
            step = step_fns[r.name]
            return max((step(x) - e).abs().max().item() for x, e in zip(xs, expected))
        r.check = check

    for r in rows:
        wrap(r)
    print(f"\nW2: {args.steps} steps, batch 1..{args.max_batch} "
          f"({len(set(sizes))} distinct sizes, buckets {buckets}); setting up rows", flush=True)
    timings = run_rows(rows, device, warmup=args.w2_warmup, repeats=args.w2_repeats, number=1,
                       per_call_divisor=len(xs), counter=counter)
    check_rows(rows)
    finish_hpuopt_info(rows)
    print(format_rows(rows, timings, device, "W2 decode loop (per step; 'first' = first pass "
                      "over all steps)", unit="step"))
    for r in rows:
        if r.kind == "hpugraph" and r.name in timings:
            cc = r.info.get("check_counters", {})
            print(f"  {r.name}: {r.info.get('graphs')} graphs for {len(buckets)} buckets, "
                  f"held {_fmt_b(r.info.get('held_bytes'))}, pad waste "
                  f"{cc.get('pad_waste', 0):.1%} of padded inputs' elements")
    goals = []
    hp = next((r for r in rows if r.name == "hpugraph"), None)
    hand = next((r for r in rows if r.name == "hand-written"), None)
    if device == "cuda":
        g = hp.info.get("graphs") if hp else None
        goals.append(_goal_line(f"W2 hpugraph graphs <= buckets ({len(buckets)})", g,
                                g is not None and g <= len(buckets)))
        for key in ("reserved_delta", "alloc_delta"):
            a = hp.info.get(key) if hp else None
            b = hand.info.get(key) if hand else None
            ratio = a / b if a is not None and b else None
            goals.append(_goal_line(f"W2 hpugraph {key} <= {GOAL_W2_MEM_VS_HAND}x hand-written",
                                    ratio, ratio is not None and ratio <= GOAL_W2_MEM_VS_HAND))
    else:
        s = _speed(timings, "hpugraph", "eager")
        if s is not None:
            print(f"  hpugraph vs eager: {s:.2f}x faster (wall)")
    notes = suspicious(rows, timings, buckets=len(buckets))
    return {
        "model": f"{args.w2_blocks} x (Linear({args.hidden}) + GELU + LayerNorm), dynamic=True",
        "sizes": sizes,
        "buckets": buckets,
        "rows": rows_payload(rows, timings),
        "goals": goals,
        "notes": notes,
    }


# -- W3 ---------------------------------------------------------------------------------------


def hand_w3(model: MaskedTwoHalves, x0: torch.Tensor, hidden: int, device: str
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The first half captured at the input's shape; the selection eager; the second half
    captured per power-of-two bucket of selected rows (one pool), output sliced, sum eager."""
    pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream()
    rows = x0.shape[0]
    static_x = x0.clone()
    g1, static_h = cuda_capture(model.first, static_x, pool, side)
    second: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    for b in sorted({next_pow2(n) for n in range(1, rows + 1)}, reverse=True):
        inp = torch.zeros(b, hidden, device=device)
        g, out = cuda_capture(model.second, inp, pool, side)
        second[b] = (g, inp, out)
    torch.cuda.synchronize()
    thr = model.thr

    def call(x: torch.Tensor) -> torch.Tensor:
        static_x.copy_(x)
        g1.replay()
        h = static_h[static_h.norm(dim=-1) > thr]
        n = h.shape[0]
        if n == 0:
            return torch.zeros((), device=device)
        g, inp, out = second[next_pow2(n)]
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
    norms = torch.cat([model.first(x).norm(dim=-1) for x in xs])
    model.thr = float(norms.median())
    selected = [int((model.first(x).norm(dim=-1) > model.thr).sum()) for x in xs]
    expected = [model(x).clone() for x in xs]

    rows = standard_rows(model, device, args, dynamic=None,
                         hand=lambda m: hand_w3(m, xs[0], args.hidden, device))
    rows.append(_hpuopt_row("hpuopt.compile", model))
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for r in rows:
        build = r.build
        if r.name == "eager":
            build = lambda: model  # noqa: E731
        if build is None:
            continue

        def built(r: Row = r, build: Callable[[], Any] = build) -> Callable[[], Any]:
            f = build()
            fns[r.name] = f
            it = itertools.cycle(xs)
            return lambda: f(next(it))

        def check(r: Row = r) -> float:
            f = fns[r.name]
            return max((f(x) - e).abs().max().item() for x, e in zip(xs, expected))

        r.build, r.check = built, check
    number = max(len(xs), args.number // len(xs) * len(xs))
    print(f"\nW3: batch {args.w3_batch}, {args.w3_sets} input sets, rows selected per set "
          f"{selected} (thr {model.thr:.3f}); setting up rows", flush=True)
    timings = run_rows(rows, device, warmup=max(args.warmup, 2 * len(xs)), repeats=args.repeats,
                       number=number, counter=counter)
    check_rows(rows)
    finish_hpuopt_info(rows)
    print(format_rows(rows, timings, device, "W3 static -> mask -> static -> sum (per call)"))
    goals = []
    for name in ("hpugraph", "hpuopt.compile"):
        if device == "cuda":
            s = _speed(timings, name, "reduce-overhead")
            goals.append(_goal_line(f"W3 {name} >= {GOAL_W3_VS_RO}x reduce-overhead", s,
                                    s is not None and s >= GOAL_W3_VS_RO))
        else:
            s = _speed(timings, name, "eager")
            if s is not None:
                print(f"  {name} vs eager: {s:.2f}x faster (wall)")
    notes = suspicious(rows, timings)
    return {
        "model": f"{args.w3_blocks} blocks + Linear -> h[h.norm(-1) > thr] -> "
                 f"{args.w3_blocks} blocks -> sum, hidden {args.hidden}",
        "batch": args.w3_batch,
        "selected_rows_per_set": selected,
        "threshold": model.thr,
        "rows": rows_payload(rows, timings),
        "goals": goals,
        "notes": notes,
    }


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3"],
                   choices=["W1", "W2", "W3"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--skip-inductor", action="store_true",
                   help="skip the inductor and reduce-overhead rows (slow to compile on CPU)")
    p.add_argument("--quick", action="store_true", help="few steps and repeats, no JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--blocks", type=int, default=8, help="W1 blocks")
    p.add_argument("--w1-batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--number", type=int, default=50, help="calls per repeat (W1, W3)")
    p.add_argument("--w2-blocks", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="W2's batch-size sequence")
    p.add_argument("--w2-warmup", type=int, default=2, help="W2 warm-up passes")
    p.add_argument("--w2-repeats", type=int, default=9, help="W2 timed passes")
    p.add_argument("--w3-blocks", type=int, default=4)
    p.add_argument("--w3-batch", type=int, default=32)
    p.add_argument("--w3-sets", type=int, default=8)
    p.add_argument("--name", default="workloads", help="results/<name>-<device>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats, args.number = 3, 3, 8
        args.steps, args.w2_warmup, args.w2_repeats = 30, 1, 3
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")

    warnings.filterwarnings("ignore", message="hpuopt: .* runs uncaptured")
    _ensure_backend()
    _raise_dynamo_limits()
    threads = _common.set_threads(args.threads)
    counter = CaptureCounter()
    machine = _common.machine_info(device)
    if device == "cuda":
        machine["cuda"] = torch.version.cuda
    print(f"workloads {' '.join(args.workloads)} on {device}"
          f"{' (' + machine.get('device_name', '') + ')' if device == 'cuda' else ''}, "
          f"{threads} thread(s), torch {torch.__version__}, {machine['cpu_model']}", flush=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "workloads",
        "machine": machine,
        "config": dict(vars(args)),
        "goals": {
            "gpu": {
                "W1_b1_speedup_vs_eager_min": GOAL_W1_VS_EAGER,
                "W1_b1_time_vs_hand_written_max": GOAL_W1_VS_HAND,
                "W3_speedup_vs_reduce_overhead_min": GOAL_W3_VS_RO,
                "W2_graphs_max": "number of buckets",
                "W2_memory_vs_hand_written_max": GOAL_W2_MEM_VS_HAND,
            },
            "cpu": "ratios against eager are printed; no thresholds",
        },
    }
    with torch.no_grad():
        if "W1" in args.workloads:
            result["W1"] = workload_w1(args, device, counter)
        if "W2" in args.workloads:
            result["W2"] = workload_w2(args, device, counter)
        if "W3" in args.workloads:
            result["W3"] = workload_w3(args, device, counter)
    result["elapsed_s"] = time.perf_counter() - started
    print(f"\nelapsed {result['elapsed_s']:.0f}s")
    if not args.quick:
        path = _common.write_results(args.name, device, result)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
