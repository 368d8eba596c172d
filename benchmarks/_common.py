"""Shared timing, machine-description and result helpers for the benchmarks.

How a row is timed (:func:`time_rows`)
--------------------------------------
* The **first call** of each row is timed on its own and reported apart: for a compiled row it
  holds Dynamo tracing, AOTAutograd, the passes and the first capture.
* Then ``warmup`` calls per row, timed in total and reported apart (never mixed into the
  per-call numbers).
* Then ``repeats`` rounds; in each round every row runs ``number`` calls back to back. Rows are
  **interleaved round by round** (A B C A B C ...), so a burst of load from another process on
  a shared machine hits every row about equally and ratios stay meaningful.
* Per row we report the per-call **median over repeats**, its interquartile range and the
  minimum, in wall-clock time (``time.perf_counter_ns``) and in CPU time of the process
  (``time.process_time_ns``). On an idle machine the two agree for a single-threaded run; on a
  loaded one wall time inflates and CPU time is the more faithful of the two.
* Ratios are taken against a baseline row measured in the same run, never against stored
  numbers.

``torch.set_num_threads`` is fixed by :func:`set_threads` before timing and recorded in the
machine description.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- timing -----------------------------------------------------------------------------------


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
        return _iqr(self.wall_per_call_s)

    @property
    def cpu_iqr_s(self) -> float:
        return _iqr(self.cpu_per_call_s)

    def summary(self) -> dict[str, Any]:
        w, c = self.wall_per_call_s, self.cpu_per_call_s
        return {
            "name": self.name,
            "first_call_s": self.first_call_s,
            "warmup_calls": self.warmup_calls,
            "warmup_s": self.warmup_s,
            "repeats": self.repeats,
            "calls_per_repeat": self.number,
            "wall_median_s": statistics.median(w),
            "wall_q1_s": _quartiles(w)[0],
            "wall_q3_s": _quartiles(w)[1],
            "wall_iqr_s": _iqr(w),
            "wall_min_s": min(w),
            "cpu_median_s": statistics.median(c),
            "cpu_q1_s": _quartiles(c)[0],
            "cpu_q3_s": _quartiles(c)[1],
            "cpu_iqr_s": _iqr(c),
            "cpu_min_s": min(c),
            "wall_per_call_s": w,
            "cpu_per_call_s": c,
        }


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _iqr(values: Sequence[float]) -> float:
    q1, q3 = _quartiles(values)
    return q3 - q1


def time_rows(
    rows: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 20,
    repeats: int = 15,
    number: int = 100,
    first_call: bool = True,
) -> dict[str, Timing]:
    """Times each zero-argument callable of ``rows`` (see the module docstring).

    ``first_call=False`` when the callables were already called (the first call then is not
    a cold one); ``first_call_s`` is reported as NaN.
    """
    first: dict[str, float] = {}
    warm: dict[str, float] = {}
    for name, fn in rows.items():
        if first_call:
            start = time.perf_counter_ns()
            fn()
            first[name] = (time.perf_counter_ns() - start) / 1e9
        else:
            first[name] = float("nan")
        start = time.perf_counter_ns()
        for _ in range(warmup):
            fn()
        warm[name] = (time.perf_counter_ns() - start) / 1e9
    wall: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            w0, c0 = time.perf_counter_ns(), time.process_time_ns()
            for _ in range(number):
                fn()
            c1, w1 = time.process_time_ns(), time.perf_counter_ns()
            wall[name].append((w1 - w0) / 1e9 / number)
            cpu[name].append((c1 - c0) / 1e9 / number)
    return {
        name: Timing(name, first[name], warmup, warm[name], repeats, number, wall[name], cpu[name])
        for name in rows
    }


def time_callable(fn: Callable[[], Any], name: str = "fn", **kwargs: Any) -> Timing:
    """:func:`time_rows` for a single callable."""
    return time_rows({name: fn}, **kwargs)[name]


# -- machine ----------------------------------------------------------------------------------


def set_threads(n: int) -> int:
    """Fixes ``torch.set_num_threads`` for the run and returns what torch reports back."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


# -- output -----------------------------------------------------------------------------------


def ratio_rows(
    timings: Mapping[str, Timing], baseline: str
) -> list[dict[str, Any]]:
    """Summaries of every row with its wall and CPU ratios against ``baseline`` (same run)."""
    base = timings[baseline]
    rows = []
    for t in timings.values():
        row = t.summary()
        row["wall_ratio_vs_" + baseline] = t.median_s / base.median_s
        row["cpu_ratio_vs_" + baseline] = t.cpu_median_s / base.cpu_median_s
        rows.append(row)
    return rows


def format_table(timings: Mapping[str, Timing], baseline: str, title: str = "") -> str:
    """A fixed-width table: first call, per-call median (IQR) wall and CPU, ratios."""
    base = timings[baseline]
    width = max(len(n) for n in timings) + 2
    head = (
        f"{'row':<{width}}{'first call':>11}{'wall/call':>11}{'IQR':>8}"
        f"{'cpu/call':>10}{'IQR':>8}{'x wall':>8}{'x cpu':>7}"
    )
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for t in timings.values():
        first = "-" if t.first_call_s != t.first_call_s else _fmt_s(t.first_call_s)
        lines.append(
            f"{t.name:<{width}}{first:>11}{_fmt_s(t.median_s):>11}{_fmt_s(t.iqr_s):>8}"
            f"{_fmt_s(t.cpu_median_s):>10}{_fmt_s(t.cpu_iqr_s):>8}"
            f"{t.median_s / base.median_s:>8.2f}{t.cpu_median_s / base.cpu_median_s:>7.2f}"
        )
    lines.append(f"(ratios against '{baseline}' measured in the same run; per-call medians "
                 f"over {base.repeats} repeats of {base.number} calls)")
    return "\n".join(lines)


def _fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds * 1e6:.0f}us"


def write_results(name: str, device: str, payload: Mapping[str, Any]) -> Path:
    """Writes ``payload`` to ``benchmarks/results/<name>-<device>.json`` and returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{device}.json"
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


class Block(torch.nn.Module):
    """Linear + GELU + LayerNorm: the host-bound block the overhead and workload models stack."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.nn.functional.gelu(self.lin(x)))
