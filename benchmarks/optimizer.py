"""One optimizer step over many small parameters: clip_grad_norm_ + Adam (or AdamW).

The step is ``clip_grad_norm_(params, 1.0); opt.step()`` over ``--params`` tensors whose sizes
are drawn once from a fixed seed in [16, 4096] elements: host-bound. Rows, interleaved (see
``benchmarks/README.md`` for each): eager for-loop (the reference), eager foreach, eager fused,
inductor, hpugraph, "hpugraph optim.step" (the step calls ``hpuopt.optim.step(opt)``: one
Dynamo graph instead of three frames), hpugraph with a guard filter (``--guard-filters``), and
the gradient refresh alone. Each call of a row first copies the next pre-drawn gradient set
into its ``.grad`` tensors; the goals are evaluated on CPU-time medians with that subtracted.

Every compiled row compiles its own copy of ``step`` with ``isolate_recompiles=True`` where
torch has it (torch 2.11 does not): otherwise Dynamo keeps all rows' entries on the one code
object of ``Adam.step``, and a row whose guard filter dropped the guards that tell optimizers
apart would run another row's graph, so there the guard-filter rows are left out.

First calls are timed alone under a CPU-time budget and taken apart from hpuopt's records
(``harness.FirstCall``); rows are checked against the for-loop row after the first steps and
after all timed steps. ``--breakdown`` takes one hpugraph step apart (``harness.level_calls``,
the fused kernels alone, Dynamo through a backend whose graphs do nothing, with and without
guards).

    python benchmarks/optimizer.py                        # N = 100 and 1000, Adam, JSON written
    python benchmarks/optimizer.py --params 100 --optim adam adamw
    python benchmarks/optimizer.py --quick                # N = 20, few repeats, no JSON
    python benchmarks/optimizer.py --quick --breakdown-of opt.step
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import inspect
import os
import re
import signal
import tempfile
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import harness
import torch
from harness import LEVELS, Goal, Row

# hpuopt from this checkout: importing harness put it first on sys.path
import hpuopt
import hpuopt.optim

GOAL_VS_FUSED = 1.10  # hpugraph per step at most this many times eager fused=True
GOAL_VS_INDUCTOR = 2.0  # hpugraph at least this many times faster than inductor per step
GOAL_FIRST_CALL_S = 5.0  # hpugraph's first call (compile + capture) under this
# the rows the goals are evaluated for and whose first calls are taken apart: the same step
# written with opt.step() and with hpuopt.optim.step(opt)
GOAL_ROWS = ("hpugraph", "hpugraph optim.step")
STEP_CALLS = ("opt.step", "optim.step")  # how a step calls the optimizer (--breakdown-of)

MAX_NORM = 1.0
LR = 1e-3
WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.01}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# the optimizer options of the compiled rows (--compiled-opt); "default" is what a user writes
COMPILED_OPT: dict[str, dict[str, Any]] = {
    "default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
# each compiled row keeps its own Dynamo cache where this torch can (torch 2.11 cannot)
ISOLATE: dict[str, Any] = (
    {"isolate_recompiles": True}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {})


# -- guard filters ----------------------------------------------------------------------------

_PER_PARAM_SOURCE = re.compile(r"params'?\]?\[\d+\]|\bstate\b|\.state\[|___state")


def drop_per_param_guards_unsafe(entries: list[Any]) -> list[bool]:
    """Keeps every guard except those on one parameter, its gradient or its optimizer state
    (``params[i]``, ``params[i].grad``, ``self.state[...]``): these are the guards whose number
    grows with the parameter count. Unsafe: a parameter replaced by another of a different
    shape, or a gradient set to None, goes unnoticed."""
    return [not _PER_PARAM_SOURCE.search(e.name or "") for e in entries]


GUARD_FILTERS: dict[str, Callable[[list[Any]], list[bool]]] = {
    # what torch suggests for guard overhead; this step has no nn.Module, so it should drop nothing
    "nn_modules": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "per_param": drop_per_param_guards_unsafe,
    # the bound: no guard at all (unsafe; only the row's own isolated cache keeps it correct)
    "all": torch.compiler.skip_all_guards_unsafe,
}


class GuardCensus:
    """Wraps a guard filter and records, per compiled frame, how many guards of each type it
    saw and how many it kept."""

    def __init__(self, fn: Callable[[list[Any]], list[bool]] | None = None) -> None:
        self.fn = fn
        self.frames: list[dict[str, Any]] = []

    def __call__(self, entries: list[Any]) -> list[bool]:
        keep = self.fn(entries) if self.fn is not None else [True] * len(entries)
        self.frames.append({
            "guards": len(entries),
            "kept": sum(map(bool, keep)),
            "by_type": dict(Counter(e.guard_type for e in entries).most_common()),
            "kept_by_type": dict(Counter(
                e.guard_type for e, k in zip(entries, keep) if k).most_common()),
        })
        return keep

    def summary(self) -> dict[str, Any]:
        return {"frames": len(self.frames), "guards": sum(f["guards"] for f in self.frames),
                "kept": sum(f["kept"] for f in self.frames), "per_frame": self.frames}


# -- the problem and one row's step ----------------------------------------------------------


class Problem:
    """Parameter sizes, initial values and the gradient sets, all from one seed."""

    def __init__(self, n: int, grad_sets: int, seed: int = 0, device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(seed)
        self.device = device
        self.sizes = torch.randint(16, 4097, (n,), generator=g).tolist()
        self.init = [torch.randn(s, generator=g).to(device) for s in self.sizes]
        # randn gradients: the total norm is far above 1, so the clip really scales them
        self.grads = [[torch.randn(s, generator=g).to(device) for s in self.sizes]
                      for _ in range(grad_sets)]

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def _unique_function(fn: types.FunctionType, tag: str) -> types.FunctionType:
    """``fn`` with a code object of its own (Dynamo keeps its cache on the code object)."""
    code = fn.__code__.replace(co_name=fn.__code__.co_name + "_" + re.sub(r"\W", "_", tag))
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class Grads:
    """Gradients refreshed from the problem's gradient sets, one set per call, in turn; alone,
    the "grad refresh only" row."""

    def __init__(self, problem: Problem, calls: int = 0) -> None:
        self.problem = problem
        self.grads = [torch.zeros_like(t) for t in problem.init]
        self.calls = calls

    def refresh(self) -> None:
        torch._foreach_copy_(self.grads, self.problem.grads[self.calls % len(self.problem.grads)])
        self.calls += 1


class Step(Grads):
    """One row's parameters, gradients and optimizer; calling it refreshes the gradients and
    runs ``step``: ``clip_grad_norm_`` then ``opt.step()`` or, for ``step_call="optim.step"``,
    ``hpuopt.optim.step(opt)``. ``compile(**kw)`` makes ``step`` ``torch.compile(step, **kw)``."""

    def __init__(self, problem: Problem, optim: str, opt_kwargs: dict[str, Any],
                 clip_foreach: bool | None, step_call: str = "opt.step", tag: str = "") -> None:
        if step_call not in STEP_CALLS:
            raise ValueError(f"step_call must be one of {STEP_CALLS}, got {step_call!r}")
        super().__init__(problem)
        self.params = [torch.nn.Parameter(t.clone()) for t in problem.init]
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.opt = OPTIMIZERS[optim](self.params, lr=LR, weight_decay=WEIGHT_DECAY[optim],
                                     **opt_kwargs)
        params, opt = self.params, self.opt

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=clip_foreach)
            opt.step()

        def step_unbroken() -> None:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=clip_foreach)
            hpuopt.optim.step(opt)

        fn = step_unbroken if step_call == "optim.step" else step
        self.step: Callable[[], Any] = _unique_function(fn, tag or step_call)
        self.census: GuardCensus | None = None

    def compile(self, **kwargs: Any) -> Step:
        self.step = torch.compile(self.step, **ISOLATE, **kwargs)
        return self

    def __call__(self) -> None:
        self.refresh()
        self.step()

    def state(self) -> list[torch.Tensor]:
        out = [p.detach() for p in self.params]
        for p in self.params:
            out += [self.opt.state[p]["exp_avg"], self.opt.state[p]["exp_avg_sq"]]
        return out


def make_rows(problem: Problem, optim: str, args: argparse.Namespace) -> dict[str, Row]:
    rows = {
        "eager for-loop": Step(problem, optim, {"foreach": False}, False),
        "eager foreach": Step(problem, optim, {"foreach": True}, True),
        "eager fused": Step(problem, optim, {"fused": True}, True),
    }
    ckw = COMPILED_OPT[args.compiled_opt]
    if not args.skip_inductor:
        rows["inductor"] = Step(problem, optim, ckw, None, tag="inductor").compile()
    for name, step_call in zip(GOAL_ROWS, STEP_CALLS):
        rows[name] = Step(problem, optim, ckw, None, step_call, tag=name).compile(
            backend="hpugraph")
    out = {name: Row(name, step, compiled=step.step) for name, step in rows.items()}
    for gf in args.guard_filters:
        name = f"hpugraph gf={gf}"
        if not ISOLATE:
            out[name] = Row(name, status="n/a (torch.compile has no isolate_recompiles)")
            continue
        step = Step(problem, optim, ckw, None, tag=name)
        step.census = GuardCensus(GUARD_FILTERS[gf])
        step.compile(backend="hpugraph", options={"guard_filter_fn": step.census})
        out[name] = Row(name, step)
    return out


# -- first calls under a budget ---------------------------------------------------------------


class CompileTimeout(BaseException):
    """Raised by a timer signal inside a first call that ran past its budget (a BaseException,
    so no ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def time_budget(cpu_seconds: float, wall_factor: float = 3.0) -> Iterator[None]:
    """Interrupts the block after ``cpu_seconds`` of this process's CPU time (so other jobs on a
    shared machine do not eat the budget), or after ``wall_factor`` times that in wall time
    (inductor compiles C++ in worker processes whose CPU time is not ours)."""

    def expire(signum: int, frame: Any) -> None:
        raise CompileTimeout()

    old_prof = signal.signal(signal.SIGPROF, expire)
    old_real = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    signal.setitimer(signal.ITIMER_REAL, cpu_seconds * wall_factor)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGPROF, old_prof)
        signal.signal(signal.SIGALRM, old_real)


def first_call(row: Row, budget: float) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    try:
        with time_budget(budget):
            assert row.fn is not None
            row.fn()
    except CompileTimeout:
        row.status = "timeout"
    except Exception as exc:  # noqa: BLE001 - a compiler failure is a result too
        row.status = f"error: {type(exc).__name__}: {str(exc)[:300]}"
    row.first_call_s = time.perf_counter() - start
    row.first_call_cpu_s = time.process_time() - cpu


def run_first_calls(rows: dict[str, Row], args: argparse.Namespace) -> dict[str, harness.FirstCall]:
    """First calls in order: eager rows, then the hpugraph rows (the hpuopt.optim.step form
    first, so that it is the one that meets torch.optim's code cold), inductor last (a timeout
    there cannot leave half-built Dynamo state under a row still to compile). The goal rows'
    first calls are taken apart."""
    order = [k for k in rows if k not in ("inductor", GOAL_ROWS[1])]
    order.insert(order.index(GOAL_ROWS[0]), GOAL_ROWS[1])
    order += ["inductor"] if "inductor" in rows else []
    taken_apart: dict[str, harness.FirstCall] = {}
    for name in order:
        row = rows[name]
        if row.status != "ok":
            continue
        budget = args.compile_budget if name == "inductor" else args.hpugraph_budget
        with harness.FirstCall() if name in GOAL_ROWS else contextlib.nullcontext() as fc:
            first_call(row, budget)
        if fc is not None:
            taken_apart[name] = fc
        print(f"  first call {name:<24} {row.first_call_s:8.2f}s wall "
              f"{row.first_call_cpu_s:8.2f}s cpu  {row.status}", flush=True)
    return taken_apart


# -- correctness ------------------------------------------------------------------------------


def compare(rows: dict[str, Row], reference: str, rtol: float, atol: float) -> dict[str, Any]:
    ref = rows[reference].fn.state()  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for name, row in rows.items():
        if name == reference or row.status != "ok":
            continue
        got, calls = row.fn.state(), row.fn.calls  # type: ignore[union-attr]
        diff = max((g - r).abs().max().item() for g, r in zip(got, ref))
        out[name] = {"ok": True, "max_abs_diff": diff, "steps": calls}
        try:
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=rtol, atol=atol)
        except AssertionError as exc:
            out[name].update(ok=False, error=str(exc).splitlines()[0])
    return out


def print_checks(early: dict[str, Any], late: dict[str, Any]) -> None:
    for kind, res in (("after first call + check steps", early), ("after all timed steps", late)):
        bad = [k for k, v in res.items() if not v["ok"]]
        worst = max((v["max_abs_diff"] for v in res.values()), default=0.0)
        print(f"check vs eager for-loop {kind}: "
              f"{'all rows match' if not bad else 'MISMATCH in ' + ', '.join(bad)} "
              f"(max abs diff {worst:.2e})")


# -- goals ------------------------------------------------------------------------------------


def goals_of(rows: dict[str, Row], step_s: dict[str, float]) -> list[Goal]:
    """The goals of both goal rows, on CPU-time medians without the gradient refresh."""
    goals = []
    ind = rows.get("inductor")
    for name in GOAL_ROWS:
        row = rows[name]
        if name not in step_s:
            goals.append(Goal(f"{name} <= {GOAL_VS_FUSED}x eager fused per step", None, "<=",
                              GOAL_VS_FUSED, row=name, note=row.status))
        else:
            goals.append(Goal(f"{name} <= {GOAL_VS_FUSED}x eager fused per step",
                              step_s[name] / step_s["eager fused"], "<=", GOAL_VS_FUSED, row=name))
            if ind is not None:
                goals.append(Goal(
                    f"{name} >= {GOAL_VS_INDUCTOR}x faster than inductor",
                    step_s["inductor"] / step_s[name] if "inductor" in step_s else None, ">=",
                    GOAL_VS_INDUCTOR, row=name,
                    note="" if "inductor" in step_s else f"inductor {ind.status}"))
        for clock, value in (("wall", row.first_call_s), ("cpu", row.first_call_cpu_s)):
            goals.append(Goal(f"{name} first call < {GOAL_FIRST_CALL_S}s ({clock})", value, "<",
                              GOAL_FIRST_CALL_S, row=name))
    return goals


def first_call_report(rows: dict[str, Row], taken_apart: dict[str, harness.FirstCall]
                      ) -> dict[str, Any]:
    out = {}
    for name, fc in taken_apart.items():
        row = rows[name]
        if row.status != "ok":
            continue
        print("\n" + harness.format_layers(fc.layers(row.first_call_s), row.first_call_s,
                                           title=f"{name} first call (wall)", unit="s"))
        passes = {k[5:]: v for k, v in fc.timers().items() if k.startswith("pass ")}
        print("  passes: " + ", ".join(f"{k} {v:.2f}s" for k, v in passes.items()))
        top = sorted(fc.dynamo.items(), key=lambda kv: -kv[1])[:12]
        print("  Dynamo metrics: " + ", ".join(f"{k} {v:.2f}s" for k, v in top))
        out[name] = fc.to_json(row.first_call_s)
    return out


# -- per-step breakdown -----------------------------------------------------------------------


def fused_kernels(fused: Step, optim: str) -> Callable[[], None]:
    """The kernels eager ``fused=True`` runs, called directly on ``fused``'s state."""
    fp = fused.params
    fgrads = [p.grad for p in fp]
    fused.opt.step()  # creates the state
    st = [fused.opt.state[p] for p in fp]
    m, v, steps = [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [s["step"] for s in st]
    kernel = torch._fused_adamw_ if optim == "adamw" else torch._fused_adam_

    def kernels_only() -> None:
        norms = torch._foreach_norm(fgrads, 2.0)
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        coef = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
        torch._foreach_mul_(fgrads, coef)
        torch._foreach_add_(steps, 1)
        kernel(fp, fgrads, m, v, [], steps, lr=LR, beta1=0.9, beta2=0.999,
               weight_decay=WEIGHT_DECAY[optim], eps=1e-8, amsgrad=False, maximize=False)

    return kernels_only


def bench_breakdown(problem: Problem, optim: str, args: argparse.Namespace) -> dict[str, Any]:
    """One hpugraph step taken apart (module docstring), written as ``args.breakdown_of``
    says. No gradient refresh in these rows."""
    ckw, form = COMPILED_OPT[args.compiled_opt], args.breakdown_of
    spy = harness.SpyBackend()
    steps = {
        "hpugraph step": Step(problem, optim, ckw, None, form, "bd spy").compile(backend=spy),
        "Dynamo + null backend": Step(problem, optim, ckw, None, form, "bd null").compile(
            backend=harness.null_backend),
    }
    if ISOLATE:  # a guardless entry on a shared code object would catch the other rows' calls
        steps["Dynamo + null, no guards"] = Step(problem, optim, ckw, None, form, "bd null0").compile(
            backend=harness.null_backend,
            options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    fused = Step(problem, optim, {"fused": True}, True, tag="bd fused")
    for s in (*steps.values(), fused):
        s.refresh()
        s.step()
    steps["hpugraph step"].step()
    probes = harness.probe_graphs(spy)
    timed = {"eager fused step": fused.step, "hpugraph step": steps.pop("hpugraph step").step,
             **harness.level_calls(probes, no_grad=True),
             "fused kernels alone": fused_kernels(fused, optim),
             **{k: s.step for k, s in steps.items()}}
    timings = harness.time_rows(timed, warmup=max(2, args.warmup // 2), repeats=args.repeats,
                                number=max(2, args.number // 2), first_call=False)
    med = {k: t.cpu_median_s for k, t in timings.items()}
    null, null0 = med["Dynamo + null backend"], med.get("Dynamo + null, no guards")
    layers = ([("Dynamo guard evaluation (null - null without guards)", null - null0),
               ("Dynamo frames + Python outside graphs (null without guards)", null0)]
              if null0 is not None else [("Dynamo: guards, frames, Python (null backend)", null)])
    layers += [*harness.stack_layers(med),
               ("ATen pieces (gm.forward) minus the fused kernels alone",
                med[LEVELS[-1]] - med["fused kernels alone"]),
               ("the fused kernels alone (foreach_norm/mul, fused_adam)", med["fused kernels alone"])]
    layers.append(("residual (hpugraph step - sum of the above)",
                   med["hpugraph step"] - sum(s for _, s in layers)))
    return {"timings": timings, "layers_cpu_s": layers, "pieces": harness.describe_pieces(probes, spy.session)}


def breakdown_report(problem: Problem, optim: str, args: argparse.Namespace) -> dict[str, Any]:
    bd = bench_breakdown(problem, optim, args)
    form = "hpuopt.optim.step(opt)" if args.breakdown_of == "optim.step" else "opt.step()"
    print("\n" + harness.format_table(
        bd["timings"], "eager fused step", f"breakdown of one hpugraph step written with {form}, "
        f"{len(problem.sizes)} params (no grad refresh)"))
    print("\n" + harness.format_layers(
        bd["layers_cpu_s"], bd["timings"]["hpugraph step"].cpu_median_s, unit="ms",
        title=f"layer, {form} step (CPU time per step, medians)", sum_label="hpugraph step"))
    for p in bd["pieces"]:
        print(f"  graph {p['graph']} ({p['dynamo_nodes']} Dynamo nodes) {p['piece']}: "
              f"{p['ops']} ATen ops {p['top_ops'][:4]}; inputs {p['inputs']}: copied "
              f"{p['copied']}, read in place {p['in_place']}")
    return {"step_call": args.breakdown_of, "layers_cpu_s": dict(bd["layers_cpu_s"]),
            "rows": harness.rows_json(bd["timings"], "eager fused step"), "pieces": bd["pieces"]}


# -- one run: N parameters, one optimizer ----------------------------------------------------


@functools.cache
def process_warmup() -> float:
    """Compiles a small Linear forward and backward through hpugraph once per process, so the
    first calls timed below do not include what only the first compile of a process pays
    (imports, Dynamo's and AOTAutograd's lazy set-up). Returns the seconds it took."""
    start = time.perf_counter()
    lin = torch.nn.Linear(8, 8)
    torch.compile(lambda x: lin(x).sum(), backend="hpugraph")(torch.randn(2, 8)).backward()
    seconds = time.perf_counter() - start
    print(f"  process warm-up (first compile in this process): {seconds:.2f}s")
    return seconds


def time_and_check(rows: dict[str, Row], args: argparse.Namespace
                   ) -> tuple[dict[str, harness.Timing], dict[str, Any], dict[str, Any]]:
    """Check steps, the first comparison, the timed rows (with the refresh alone), the last."""
    live = [r for r in rows.values() if r.status == "ok"]
    for _ in range(args.check_steps):
        for r in live:
            r.fn()  # type: ignore[misc]
    early = compare(rows, "eager for-loop", rtol=1e-5, atol=1e-5)
    ref = rows["eager for-loop"].fn
    refresh = Grads(ref.problem, ref.calls)  # type: ignore[union-attr]
    timings = harness.time_rows([*live, Row("grad refresh only", refresh.refresh)],
                                warmup=args.warmup, repeats=args.repeats, number=args.number,
                                first_call=False)
    late = compare(rows, "eager for-loop", rtol=1e-3, atol=1e-4)
    return timings, early, late


def bench_one(n: int, optim: str, args: argparse.Namespace) -> dict[str, Any]:
    warm_s = process_warmup()
    torch._dynamo.reset()
    hpuopt.reset()
    gc.collect()
    problem = Problem(n, args.grad_sets, device=args.device)
    rows = make_rows(problem, optim, args)
    print(f"\n== {optim}, {n} parameters ({problem.numel} elements, sizes {min(problem.sizes)}.."
          f"{max(problem.sizes)}), load {harness.load_average() or 0:.2f}")
    taken_apart = run_first_calls(rows, args)
    timings, early, late = time_and_check(rows, args)
    print("\n" + harness.format_table(
        timings, "eager fused", f"{optim}: clip_grad_norm_ + step, {n} params, per step incl. "
        "the grad refresh", rows=[*rows.values(), Row("grad refresh only")]))
    print_checks(early, late)
    censuses = {k: r.fn.census.summary() for k, r in rows.items()  # type: ignore[union-attr]
                if r.status == "ok" and r.fn.census is not None}  # type: ignore[union-attr]
    for k, g in censuses.items():
        print(f"  guards {k:<24} {g['guards']:>7} in {g['frames']} frames, kept {g['kept']}")
    refresh_s = timings["grad refresh only"].cpu_median_s
    step_s = {k: t.cpu_median_s - refresh_s for k, t in timings.items()
              if k != "grad refresh only"}
    print("per step without the grad refresh (cpu): " + ", ".join(
        f"{k} {harness.fmt_s(v)}" for k, v in step_s.items()))
    result: dict[str, Any] = {
        "params": n, "optimizer": optim, "numel": problem.numel,
        "sizes_min_max": [min(problem.sizes), max(problem.sizes)],
        "load_average_1m_start": harness.load_average(),
        "rows": harness.rows_json(timings, "eager fused"),
        "process_warmup_s": warm_s,
        "first_call_s": {k: r.first_call_s for k, r in rows.items()},
        "first_call_cpu_s": {k: r.first_call_cpu_s for k, r in rows.items()},
        "status": {k: r.status for k, r in rows.items()},
        "check_early": early, "check_late": late, "guards": censuses,
        "step_only_cpu_s": step_s,
        "goals": harness.report_goals(goals_of(rows, step_s)),
        "first_call_breakdown": first_call_report(rows, taken_apart),
        "explain": str(hpuopt.explain()),
    }
    if args.breakdown:
        del rows, timings
        torch._dynamo.reset()
        gc.collect()
        result["breakdown"] = breakdown_report(problem, optim, args)
    return result


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__, name="optimizer", warmup=None, repeats=9, number=None,
                       number_help="calls per repeat; default max(3, 1000 // params)")
    p.add_argument("--params", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the parameters live (on cuda the harness synchronizes around each "
                        "block of timed calls)")
    p.add_argument("--optim", nargs="+", choices=sorted(OPTIMIZERS), default=["adam"])
    p.add_argument("--guard-filters", nargs="*", choices=sorted(GUARD_FILTERS),
                   default=["nn_modules", "per_param", "all"])
    p.add_argument("--skip-inductor", action="store_true")
    p.add_argument("--compiled-opt", choices=sorted(COMPILED_OPT), default="default",
                   help="optimizer options of the compiled rows (default: Adam() as is, which "
                        "on the CPU is the for-loop; foreach: Adam(foreach=True); fused: "
                        "Adam(fused=True))")
    p.add_argument("--compile-budget", type=float, default=120.0,
                   help="CPU seconds the inductor row's first call may take before it is "
                        "recorded as a timeout (wall: 3x that)")
    p.add_argument("--hpugraph-budget", type=float, default=600.0,
                   help="the same for the hpugraph rows")
    p.add_argument("--keep-compile-caches", action="store_true",
                   help="let inductor use its usual on-disk caches (first calls then depend on "
                        "earlier runs)")
    p.add_argument("--grad-sets", type=int, default=4)
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="take one hpugraph step apart")
    p.add_argument("--breakdown-of", choices=STEP_CALLS, default="optim.step",
                   help="which form of the hpugraph step --breakdown takes apart: "
                        "hpuopt.optim.step(opt) (optim.step, the default) or opt.step()")
    args = p.parse_args(argv)
    harness.quick(p, args, params=[20], repeats=3, number=5, warmup=2)
    return args


def fresh_inductor_caches() -> None:
    """A first call that hits inductor's on-disk caches (filled by an earlier run) is not a
    first call: compile into a fresh directory with the FX-graph/AOT caches off."""
    import torch._functorch.config
    import torch._inductor.config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="optimizer-bench-")
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.keep_compile_caches and not args.skip_inductor:
        fresh_inductor_caches()
    if not ISOLATE:
        harness.raise_dynamo_limits()
    machine = harness.start(args, args.device)
    print(f"optimizer: clip_grad_norm_({MAX_NORM}) + {'/'.join(args.optim)} over "
          f"{args.params} params, {args.threads} thread(s), torch {torch.__version__}, "
          f"{machine['cpu_model']}, load {harness.load_average() or 0:.2f}")
    started = time.perf_counter()
    result = harness.result_header("optimizer", args, machine)
    result["goals"] = {"max_ratio_vs_eager_fused": GOAL_VS_FUSED,
                       "min_speedup_vs_inductor": GOAL_VS_INDUCTOR,
                       "max_first_call_s": GOAL_FIRST_CALL_S}
    result["runs"] = []
    for optim in args.optim:
        for n in args.params:
            a = argparse.Namespace(**vars(args))
            a.number = args.number or max(3, 1000 // n)
            a.warmup = args.warmup if args.warmup is not None else max(3, 300 // n)
            result["runs"].append(bench_one(n, optim, a))
    harness.finish(result, args, args.device, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
