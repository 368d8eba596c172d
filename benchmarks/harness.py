"""The benchmarks' harness: timing rows, goals, layer breakdowns, machine info and results.

Every script in this folder is a set of scenarios built from these parts; none of them replaces
anything of hpuopt's: what happened inside a compile or a call is read from hpuopt's own records
(``Session`` / ``GraphRecord`` / ``AotGraphRecord``), its ``counters`` and Dynamo's metrics.

How a row is timed (:func:`time_rows`)
--------------------------------------
* The **first call** of each row is timed on its own and reported apart: for a compiled row it
  holds Dynamo tracing, AOTAutograd, the passes and the first capture (a row built lazily: the
  build too).
* Then ``warmup`` calls per row, timed in total and reported apart (never mixed into the
  per-call numbers).
* Then ``repeats`` rounds; in each round every row runs ``number`` calls back to back. Rows are
  **interleaved round by round** (A B C A B C ...), so a burst of load from another process on
  a shared machine hits every row about equally and ratios stay meaningful. On CUDA each block
  of calls is bracketed by ``torch.cuda.synchronize()``.
* Per row we report the per-call **median over repeats**, its interquartile range and the
  minimum, in wall-clock time (``time.perf_counter_ns``) and in CPU time of the process
  (``time.process_time_ns``). On an idle machine the two agree for a single-threaded run; on a
  loaded one wall time inflates and CPU time is the more faithful of the two.
* Ratios are taken against a baseline row measured in the same run, never against stored
  numbers.

``torch.set_num_threads`` is fixed by :func:`start` before timing and recorded in the machine
description.

Layer breakdowns
----------------
* Per call (:class:`SpyBackend`, :func:`probe_graphs`, :func:`level_calls`): a model compiled
  through :class:`SpyBackend` (hpugraph into a session of its own, keeping what Dynamo passed)
  is opened up level by level: the backend's callable with Dynamo's arguments, each stitching
  ``GraphModule`` (``AotGraphRecord.module``), each static piece's runner (the module's
  instance attribute of the piece's name), a replay of the piece captured by the runtime, and
  the piece's ATen graph. The arguments at every level are those of a real call, read from the
  frames of that call by a profile hook (:func:`record_calls`).
* First calls (:class:`FirstCall`): the records' pass timings (``seconds``), backend and ATen
  graph compile times, ``counters.capture_seconds`` and Dynamo's compile-time metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import operator
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))  # hpuopt from this checkout, installed or not

import hpuopt
from hpuopt.config import Config
from hpuopt.diagnostics.explain import Session, default_session, explain
from hpuopt.runtime import select_runtime

NAN = float("nan")


# -- rows and their timing --------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Per-call statistics of one row, in seconds."""

    name: str
    first_call_s: float
    warmup_calls: int
    warmup_s: float
    repeats: int
    number: int
    wall_per_call_s: list[float]
    """Per-call wall time of each repeat (the total of ``number`` calls divided by ``number``)."""
    cpu_per_call_s: list[float]
    """Per-call CPU time of the process, same repeats."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_per_call_s)

    @property
    def cpu_median_s(self) -> float:
        return statistics.median(self.cpu_per_call_s)

    @property
    def iqr_s(self) -> float:
        q1, q3 = _quartiles(self.wall_per_call_s)
        return q3 - q1

    @property
    def cpu_iqr_s(self) -> float:
        q1, q3 = _quartiles(self.cpu_per_call_s)
        return q3 - q1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "first_call_s": self.first_call_s,
            "warmup_calls": self.warmup_calls, "warmup_s": self.warmup_s,
            "repeats": self.repeats, "calls_per_repeat": self.number,
        }
        for kind, values in (("wall", self.wall_per_call_s), ("cpu", self.cpu_per_call_s)):
            q1, q3 = _quartiles(values)
            out.update({f"{kind}_median_s": statistics.median(values), f"{kind}_q1_s": q1,
                        f"{kind}_q3_s": q3, f"{kind}_iqr_s": q3 - q1, f"{kind}_min_s": min(values)})
        out["wall_per_call_s"] = self.wall_per_call_s
        out["cpu_per_call_s"] = self.cpu_per_call_s
        return out


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


@dataclasses.dataclass
class Row:
    """One row of a table: what is timed and what is known about it.

    ``fn`` is one call of the row, without arguments; a row built lazily has ``build`` (which
    returns ``fn``) instead, and a build that raises marks the row failed while the others
    still run. A row that cannot run here has a ``status`` saying why. ``kind`` is
    ``"hpugraph"`` or ``"hpuopt"`` for the rows that have hpuopt records. Whoever times the
    first call sets ``first_call_s`` (:func:`time_rows` does unless told not to)."""

    name: str
    fn: Callable[[], Any] | None = None
    build: Callable[[], Callable[[], Any]] | None = None
    status: str = "ok"
    kind: str = ""
    compiled: Any = None
    check: Callable[[], float] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_call_s: float = NAN
    first_call_cpu_s: float = NAN
    warmup_s: float = 0.0
    warmup_calls: int = 0
    timing: Timing | None = None


RowsLike = Mapping[str, Callable[[], Any]] | Sequence[Row]


def as_rows(rows: RowsLike) -> list[Row]:
    if isinstance(rows, Mapping):
        return [Row(name, fn) for name, fn in rows.items()]
    return list(rows)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_rows(rows: RowsLike, *, warmup: int = 20, repeats: int = 15, number: int = 100,
              first_call: bool = True, divisor: int = 1, device: str = "cpu",
              setup: Callable[[Row], contextlib.AbstractContextManager[Any]] | None = None,
              ) -> dict[str, Timing]:
    """Times the rows (see the module docstring) and returns their timings by name: the rows'
    :func:`set_up`, then :func:`measure`."""
    live = set_up(rows, warmup=warmup, first_call=first_call, device=device, setup=setup)
    return measure(live, repeats=repeats, number=number, divisor=divisor, device=device)


def set_up(rows: RowsLike, *, warmup: int, first_call: bool = True, device: str = "cpu",
           setup: Callable[[Row], contextlib.AbstractContextManager[Any]] | None = None,
           ) -> list[Row]:
    """Builds each row, times its first call and its ``warmup`` calls, one row after the
    other; returns the rows ready to be timed. ``first_call=False`` when the callables were
    already called (their first call is then not a cold one): ``first_call_s`` stays what it
    was (NaN unless set). ``setup(row)``, a context manager, brackets each row's set-up for
    bookkeeping."""
    return [r for r in as_rows(rows) if _set_up(r, warmup, first_call, device, setup)]


def measure(live: Sequence[Row], *, repeats: int, number: int, divisor: int = 1,
            device: str = "cpu") -> dict[str, Timing]:
    """``repeats`` rounds of ``number`` calls of each row, rows interleaved round by round;
    ``divisor`` divides every time further (a call that is several steps: per-step times)."""
    wall: dict[str, list[float]] = {r.name: [] for r in live}
    cpu: dict[str, list[float]] = {r.name: [] for r in live}
    div = number * divisor
    for _ in range(repeats):
        for row in live:
            fn = row.fn
            assert fn is not None
            sync(device)
            w0, c0 = time.perf_counter_ns(), time.process_time_ns()
            for _ in range(number):
                fn()
            sync(device)
            c1, w1 = time.process_time_ns(), time.perf_counter_ns()
            wall[row.name].append((w1 - w0) / 1e9 / div)
            cpu[row.name].append((c1 - c0) / 1e9 / div)
    for r in live:
        r.timing = Timing(r.name, r.first_call_s, r.warmup_calls, r.warmup_s, repeats, number,
                          wall[r.name], cpu[r.name])
    return {r.name: r.timing for r in live if r.timing is not None}


def _set_up(row: Row, warmup: int, first_call: bool, device: str,
            setup: Callable[[Row], contextlib.AbstractContextManager[Any]] | None) -> bool:
    """Builds the row, times its first call and its warm-up calls; False when it cannot run."""
    if row.status != "ok" or (row.fn is None and row.build is None):
        return False
    with setup(row) if setup is not None else contextlib.nullcontext():
        try:
            start, cpu = time.perf_counter_ns(), time.process_time_ns()
            if row.fn is None:
                assert row.build is not None
                row.fn = row.build()
                sync(device)
                row.info["build_s"] = (time.perf_counter_ns() - start) / 1e9
            if first_call:
                row.fn()
                sync(device)
                row.first_call_s = (time.perf_counter_ns() - start) / 1e9
                row.first_call_cpu_s = (time.process_time_ns() - cpu) / 1e9
            start = time.perf_counter_ns()
            for _ in range(warmup):
                row.fn()
            sync(device)
            row.warmup_s, row.warmup_calls = (time.perf_counter_ns() - start) / 1e9, warmup
        except Exception as exc:  # a row that fails to build is a result; others still run
            if row.build is None:
                raise
            row.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            row.info["traceback"] = traceback.format_exc(limit=8)
            print(f"  [{row.name}] {row.status}", flush=True)
            return False
    return True


def ratios(t: Timing, base: Timing, baseline: str, speedup: bool = False) -> dict[str, float]:
    """Row over baseline (``x_ratio_vs_<baseline>``) or, with ``speedup``, baseline over row."""
    if speedup:
        return {f"speedup_vs_{baseline}_wall": base.median_s / t.median_s,
                f"speedup_vs_{baseline}_cpu": base.cpu_median_s / t.cpu_median_s}
    return {f"wall_ratio_vs_{baseline}": t.median_s / base.median_s,
            f"cpu_ratio_vs_{baseline}": t.cpu_median_s / base.cpu_median_s}


def rows_json(timings: Mapping[str, Timing], baseline: str, rows: Sequence[Row] | None = None,
              *, speedup: bool = False) -> list[dict[str, Any]]:
    """Every row's summary and ratios against ``baseline``; with ``rows``, also the rows that
    did not run (their status) and each row's ``info``."""
    base = timings.get(baseline)
    out = []
    for r in rows if rows is not None else [Row(n) for n in timings]:
        item: dict[str, Any] = {"name": r.name}
        if rows is not None:
            item["status"] = r.status
        t = timings.get(r.name)
        if t is not None:
            item.update(t.summary())
            if base is not None:
                item.update(ratios(t, base, baseline, speedup))
        if rows is not None:
            item["info"] = dict(r.info)
        out.append(item)
    return out


# -- tables -----------------------------------------------------------------------------------

Column = tuple[str, int, Callable[[Row], str]]
"""An extra table column: header, width, the cell of a row."""


def format_table(timings: Mapping[str, Timing], baseline: str, title: str = "", *,
                 rows: Sequence[Row] | None = None, speedup: bool = False,
                 columns: Sequence[Column] = (), unit: str = "call") -> str:
    """A fixed-width table: first call, per-call median (IQR) wall and CPU, ratios against
    ``baseline`` (row/baseline, or baseline/row with ``speedup``), then ``columns``."""
    rows = rows if rows is not None else [Row(n) for n in timings]
    base = timings.get(baseline)
    width = max(len(r.name) for r in rows) + 2
    head = (f"{'row':<{width}}{'first call':>11}{'wall/' + unit:>11}{'IQR':>8}"
            f"{'cpu/' + unit:>10}{'IQR':>8}{'x wall':>8}{'x cpu':>7}"
            + "".join(f"{h:>{w}}" for h, w, _ in columns))
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        t = timings.get(r.name)
        if t is None:
            lines.append(f"{r.name:<{width}}{r.status}")
            continue
        x = ratios(t, base, baseline, speedup).values() if base else (NAN, NAN)
        xw, xc = x
        lines.append(
            f"{r.name:<{width}}{fmt_s(t.first_call_s):>11}{fmt_s(t.median_s):>11}"
            f"{fmt_s(t.iqr_s):>8}{fmt_s(t.cpu_median_s):>10}{fmt_s(t.cpu_iqr_s):>8}"
            f"{xw:>8.2f}{xc:>7.2f}" + "".join(f"{cell(r):>{w}}" for _, w, cell in columns))
    if base is not None:
        how = f"'{baseline}' time over the row's" if speedup else f"the row over '{baseline}'"
        lines.append(f"(x = {how}, measured in the same run; per-{unit} medians over "
                     f"{base.repeats} repeats of {base.number} calls; first call apart)")
    return "\n".join(lines)


def fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if abs(seconds) >= 1:
        return f"{seconds:.2f}s"
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds * 1e6:.0f}us"


def fmt_bytes(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


Layers = list[tuple[str, float]]


def format_layers(layers: Layers, total: float, *, title: str, unit: str = "us",
                  share: str = "%", sum_label: str = "sum of the layers") -> str:
    """One line per layer: its time and its share of ``total``, then their sum."""
    scale = {"us": 1e6, "ms": 1e3, "s": 1.0}[unit]
    width = max(len(title), *(len(n) for n, _ in layers)) + 2
    lines = [f"{title:<{width}}{unit:>9}{share:>9}"]
    for name, s in [*layers, (sum_label, sum(s for _, s in layers))]:
        lines.append(f"{name:<{width}}{s * scale:>9.2f}{100 * s / total:>8.1f}%")
    return "\n".join(lines)


# -- goals ------------------------------------------------------------------------------------

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


@dataclasses.dataclass
class Goal:
    """A goal: what it says, the value measured (None: not measured), the threshold it is held
    to and how (``op``: ``value op threshold`` is met). Evaluated and printed, never asserted."""

    text: str
    value: float | None
    op: str
    threshold: float
    row: str | None = None
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.value is None or self.value != self.value:
            return None
        return bool(_OPS[self.op](self.value, self.threshold))

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]

    def line(self) -> str:
        value = "-" if self.value is None else f"{self.value:.2f}"
        note = f" ({self.note})" if self.note else ""
        return f"goal {self.text}: {value} -> {self.verdict}{note}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"goal": self.text, "value": self.value, "op": self.op,
                               "threshold": self.threshold, "met": self.met,
                               "verdict": self.verdict}
        if self.row is not None:
            out["row"] = self.row
        if self.note:
            out["note"] = self.note
        return {**out, **self.extra}


def report_goals(goals: Sequence[Goal], indent: str = "") -> list[dict[str, Any]]:
    """Prints each goal's line and returns them as JSON."""
    for g in goals:
        print(indent + g.line())
    return [g.to_json() for g in goals]


def speedup(timings: Mapping[str, Timing], a: str, b: str) -> float | None:
    """How many times faster row ``a`` is than row ``b`` (wall medians), or None."""
    if a in timings and b in timings:
        return timings[b].median_s / timings[a].median_s
    return None


# -- machine, command line, results ----------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on, without the host name."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    if load_average() is not None:
        info["load_average_1m"] = load_average()
    return info


def git_state() -> dict[str, Any]:
    """The checkout's HEAD and its modified tracked files."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=BENCH_DIR.parent, capture_output=True, text=True,
                              timeout=10, check=False).stdout

    try:
        modified = git("status", "--short", "--untracked-files=no").split("\n")
        return {"head": git("rev-parse", "HEAD").strip(),
                "modified": [d.strip() for d in modified if d.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {}


def parser(doc: str, *, name: str, warmup: int | None, repeats: int, number: int | None,
           number_help: str = "calls per repeat") -> argparse.ArgumentParser:
    """The options every benchmark has; each script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the run")
    p.add_argument("--warmup", type=int, default=warmup, help="warm-up calls per row")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds (interleaved)")
    p.add_argument("--number", type=int, default=number, help=number_help)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (fewer repeats); writes JSON only with --out-dir")
    p.add_argument("--name", default=name, help="results/<name>-<device>.json")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="write the results JSON here instead of benchmarks/results/ "
                        "(also with --quick)")
    return p


def quick(p: argparse.ArgumentParser, args: argparse.Namespace, **values: Any) -> None:
    """With ``--quick``, these values for the options the command line left at their default."""
    if args.quick:
        for k, v in values.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)


def ensure_backend() -> None:
    """Registers ``hpugraph`` when the package is not installed (no entry point)."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "hpugraph" not in list_backends(exclude_tags=()):
        register_backend(compiler_fn=hpuopt.hpugraph_backend, name="hpugraph")


def set_threads(n: int) -> int:
    """Fixes ``torch.set_num_threads`` for the run and returns what torch reports back."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def start(args: argparse.Namespace, device: str = "cpu") -> dict[str, Any]:
    """Fixes the thread count, quiets hpuopt's expected warnings, returns the machine info."""
    warnings.filterwarnings("ignore", message="hpuopt: .* runs uncaptured")
    warnings.filterwarnings("ignore", message=".*Profiler record function.*")
    set_threads(args.threads)
    ensure_backend()
    return machine_info(device)


def result_header(benchmark: str, args: argparse.Namespace, machine: dict[str, Any]
                  ) -> dict[str, Any]:
    return {"benchmark": benchmark, "machine": machine, "config": vars(args).copy(),
            "git": git_state()}


def finish(result: dict[str, Any], args: argparse.Namespace, device: str, started: float
           ) -> Path | None:
    """Records the elapsed time and writes the results (not for --quick without --out-dir)."""
    result["elapsed_s"] = time.perf_counter() - started
    load = load_average()
    if load is not None:
        result["machine"]["load_average_1m_end"] = load
    print(f"\nelapsed {result['elapsed_s']:.0f}s" + (f", load {load:.2f}" if load else ""))
    if args.quick and args.out_dir is None:
        return None
    path = write_results(args.name, device, result, args.out_dir)
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def write_results(name: str, device: str, payload: Mapping[str, Any],
                  out_dir: Path | None = None) -> Path:
    """Writes ``payload`` to ``<out_dir or benchmarks/results>/<name>-<device>.json``."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device}.json"
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (torch.Size, tuple, set, frozenset)):
        return list(value)
    return str(value)


# -- models and Dynamo ------------------------------------------------------------------------


class Block(torch.nn.Module):
    """Linear + GELU + LayerNorm: the host-bound block the overhead and workload models stack."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.nn.functional.gelu(self.lin(x)))


def make_mlp(blocks: int, hidden: int, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[Block(hidden) for _ in range(blocks)])


def dynamo_frames() -> int:
    """Frames Dynamo has compiled so far (a timed call that compiles shows up here)."""
    from torch._dynamo.utils import counters as dynamo_counters

    return sum(dynamo_counters["frames"].values())


def raise_dynamo_limits() -> None:
    """Every compiled copy of a model shares its ``forward`` code object (and every optimizer
    its ``step``), so their cache entries add up on one frame; the default limit (8) would
    silently send later rows to eager."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 256)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = 4096


def null_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """A backend whose graphs do nothing: Dynamo's own cost with hot caches."""
    out = gm(*example_inputs)
    return lambda *a: out


# -- per-call layer breakdown -----------------------------------------------------------------


class SpyBackend:
    """A Dynamo backend: hpugraph, compiling into a session of its own, that keeps per Dynamo
    graph the callable it returned, the Dynamo graph, its record and the arguments Dynamo passed
    on the first call (one wrapper frame per call, well under a microsecond)."""

    def __init__(self) -> None:
        self.session = Session()
        self.graphs: list[dict[str, Any]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        fn = hpuopt.hpugraph_backend(gm, example_inputs, session=self.session)
        seen = {"fn": fn, "gm": gm, "record": self.session.graphs[-1]}
        self.graphs.append(seen)

        def call(*args: Any) -> Any:
            if "args" not in seen:
                seen["args"] = args
            return fn(*args)

        return call


def _frame_args(frame: Any) -> tuple[Any, ...]:
    """The positional arguments (after ``self``) a Python frame was called with."""
    co, loc = frame.f_code, frame.f_locals
    args = [loc[n] for n in co.co_varnames[1:co.co_argcount]]
    if co.co_flags & inspect.CO_VARARGS:
        args += list(loc[co.co_varnames[co.co_argcount + co.co_kwonlyargcount]])
    return tuple(args)


def record_calls(fn: Callable[[], Any], objects: Sequence[Any]) -> dict[int, tuple[Any, ...]]:
    """Calls ``fn()`` once and returns, by ``id``, the arguments each of ``objects`` (modules,
    runners) was first called with in it: read from the frame of each method call whose
    ``self`` is one of them, by a profile hook. Nothing is replaced or wrapped."""
    wanted = {id(o) for o in objects}
    found: dict[int, tuple[Any, ...]] = {}

    def hook(frame: Any, event: str, arg: Any) -> None:
        co = frame.f_code
        if event == "call" and co.co_argcount:
            me = id(frame.f_locals.get(co.co_varnames[0]))
            if me in wanted and me not in found:
                found[me] = _frame_args(frame)

    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(old)
    return found


@dataclasses.dataclass
class PieceProbe:
    graph: int
    name: str
    runner: Any
    module: torch.fx.GraphModule
    """The piece's own ATen graph (the stitching module's ``_modules`` entry)."""
    args: tuple[Any, ...]
    replay: Callable[[], None]
    slot: tuple[int, int]
    """Where its report is in its graph's ``explain()`` entry: ATen graph, piece."""


@dataclasses.dataclass
class GraphProbe:
    index: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    gm: torch.fx.GraphModule
    """The torch-level graph Dynamo captured."""
    stitches: list[tuple[torch.fx.GraphModule, tuple[Any, ...]]]
    pieces: list[PieceProbe]


def _replay_of(piece: torch.fx.GraphModule, args: Sequence[Any]) -> Callable[[], None]:
    """The piece captured by the runtime on (detached) ``args``, as the runner captures it."""
    forward = piece.forward
    out = next(n for n in piece.graph.nodes if n.op == "output").args[0]
    if isinstance(out, (tuple, list)):
        fn: Callable[..., list[Any]] = lambda *a: list(forward(*a))
    else:
        fn = lambda *a: [forward(*a)]
    static = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    config = Config.from_options(None)
    return select_runtime(config, static).capture(fn, static, config.warmup_runs).replay


def probe_graphs(spy: SpyBackend) -> list[GraphProbe]:
    """Every Dynamo graph ``spy`` compiled and has been called, opened up with the arguments
    of a real call at every level (the stitching modules of its forward or inference ATen
    graphs, their runners)."""
    probes = []
    for seen in spy.graphs:
        record = seen["record"]
        if "args" not in seen or not any(g is record for g in spy.session.graphs):
            continue
        aots = [a for a in record.aot_graphs if a.kind != "backward"]
        static = [(a.module, p, (i, j)) for i, a in enumerate(record.aot_graphs)
                  for j, p in enumerate(a.pieces) if a in aots and p.runner is not None]
        objects = [a.module for a in aots] + [p.runner for _, p, _ in static]
        with torch.no_grad():
            found = record_calls(functools.partial(seen["fn"], *seen["args"]), objects)
        pieces = [
            PieceProbe(record.index, p.info.name, p.runner, m._modules[p.info.name],
                       found[id(p.runner)],
                       _replay_of(m._modules[p.info.name], found[id(p.runner)]), slot)
            for m, p, slot in static if id(p.runner) in found
        ]
        stitches = [(a.module, found[id(a.module)]) for a in aots if id(a.module) in found]
        probes.append(GraphProbe(record.index, seen["fn"], seen["args"], seen["gm"], stitches,
                                 pieces))
    return probes


LEVELS = ("backend callable(*args)", "stitching graph forward(*args)", "PieceRunner(*args)",
          "runtime replay()", "ATen piece gm.forward")
"""The rows :func:`level_calls` makes, from the top of an hpugraph call down."""


def level_calls(probes: Sequence[GraphProbe], no_grad: bool = False
                ) -> dict[str, Callable[[], Any]]:
    """One callable per level of :data:`LEVELS`, each calling that level of every graph with
    the recorded arguments. ``no_grad``: below the backend callable, run under
    ``torch.no_grad()`` as AOTAutograd's runtime wrapper does."""
    pieces = [p for g in probes for p in g.pieces]
    calls = [
        [functools.partial(g.fn, *g.args) for g in probes],
        [functools.partial(m.forward, *a) for g in probes for m, a in g.stitches],
        [functools.partial(p.runner, *p.args) for p in pieces],
        [p.replay for p in pieces],
        [functools.partial(p.module.forward, *p.args) for p in pieces],
    ]
    return {name: _chain(cs, no_grad and i > 0) for i, (name, cs) in enumerate(zip(LEVELS, calls))}


def _chain(calls: list[Callable[[], Any]], no_grad: bool) -> Callable[[], Any]:
    if len(calls) == 1 and not no_grad:
        return calls[0]

    def go() -> None:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            for c in calls:
                c()

    return go


def stack_layers(med: Mapping[str, float]) -> Layers:
    """The layers between the backend callable and the ATen pieces, from medians of the
    :func:`level_calls` rows."""
    b, s, r, p, g = (med[k] for k in LEVELS)
    return [
        ("AOTAutograd runtime wrapper (backend callable - stitching forward)", b - s),
        ("hpuopt stitching graph (forward - PieceRunners)", s - r),
        ("PieceRunner.__call__: key, address checks, input copies, output clones", r - p),
        ("runtime replay (CPU: the emulation; replay - gm.forward)", p - g),
    ]


def describe_pieces(probes: Sequence[GraphProbe], session: Session) -> list[dict[str, Any]]:
    """What each probed piece holds now: ops, inputs read in place or copied (from explain)."""
    reports = {g.index: g for g in explain(session).graphs}
    out = []
    for g in probes:
        for p in g.pieces:
            report = reports[g.index].aot_graphs[p.slot[0]].pieces[p.slot[1]]
            ops = [str(n.target) for n in p.module.graph.nodes if n.op == "call_function"]
            out.append({"graph": g.index, "dynamo_nodes": len(g.gm.graph.nodes),
                        "piece": p.name, "ops": len(ops),
                        "top_ops": Counter(ops).most_common(6), "inputs": len(p.args),
                        "copied": report.inputs_copied, "in_place": report.inputs_in_place,
                        "graphs": list(report.graphs)})
    return out


# -- first-call breakdown ---------------------------------------------------------------------


def _dynamo_metrics() -> dict[str, float]:
    from torch._dynamo.utils import compilation_time_metrics

    return {k: sum(v) for k, v in compilation_time_metrics.items()}


class FirstCall:
    """Where the time of the first calls in a ``with`` block went, from the records hpuopt adds
    to ``session`` meanwhile (pass timings, backend and ATen graph compile times),
    ``counters.capture_seconds`` (warm-up + capture) and Dynamo's compile-time metrics."""

    def __init__(self, session: Session | None = None) -> None:
        self.session = session if session is not None else default_session
        self.records: list[Any] = []
        self.capture_s = 0.0
        self.dynamo: dict[str, float] = {}

    def __enter__(self) -> FirstCall:  # noqa: PYI034
        self._start = len(self.session.graphs)
        self._counters = hpuopt.counters.snapshot()
        self._dynamo = _dynamo_metrics()
        return self

    def __exit__(self, *exc: object) -> None:
        self.records = list(self.session.graphs[self._start:])
        self.capture_s = hpuopt.counters.delta(self._counters)["capture_seconds"]
        self.dynamo = {k: v - self._dynamo.get(k, 0.0) for k, v in _dynamo_metrics().items()
                       if v - self._dynamo.get(k, 0.0) > 0}

    def timers(self) -> dict[str, float]:
        """hpuopt's own timings: backend calls, pre-AOT passes, ATen graph compiles, capture,
        and each pass (``pass <name>``, summed over graphs)."""
        t: Counter[str] = Counter()
        for g in self.records:
            t["backend"] += g.backend_seconds
            t["pre-AOT passes"] += sum(g.seconds.values())
            for a in g.aot_graphs:
                t["ATen graph compiles"] += a.compile_seconds
            for name, s in [*g.seconds.items(), *(i for a in g.aot_graphs for i in a.seconds.items())]:
                t[f"pass {name}"] += s
        t["warm-up + capture"] = self.capture_s
        return dict(t)

    def layers(self, total: float) -> Layers:
        """The first call's ``total`` seconds in layers that add up to it."""
        t = self.timers()
        backend, pre = t.get("backend", 0.0), t.get("pre-AOT passes", 0.0)
        late = sum(a.compile_seconds for g in self.records for a in g.aot_graphs
                   if a.kind == "backward")  # compiled on the first backward, not in the backend
        aten = t.get("ATen graph compiles", 0.0)
        return [
            ("Dynamo: tracing, guards, codegen, Python between graphs (rest)",
             total - backend - late - self.capture_s),
            ("hpuopt pre-AOT passes", pre),
            ("AOTAutograd (backend - pre-AOT passes - ATen graph compiles)",
             backend - pre - (aten - late)),
            ("hpuopt ATen graph compiles (post-AOT passes, runners)", aten),
            ("first runs: warm-up + capture (counters.capture_seconds)", self.capture_s),
        ]

    def to_json(self, total: float) -> dict[str, Any]:
        return {"total_s": total, "layers_s": dict(self.layers(total)),
                "hpuopt_timers_s": self.timers(), "dynamo_metrics_s": self.dynamo}
