"""One optimizer step over many small parameters: clip_grad_norm_ + Adam (or AdamW).

The step is ``clip_grad_norm_(params, 1.0); opt.step()`` over ``--params`` parameter tensors
(or, in the "hpugraph optim.step" row, ``clip_grad_norm_(params, 1.0); hpuopt.optim.step(opt)``)
whose sizes are drawn once from a fixed seed in [16, 4096] elements: every kernel is tiny, so the
time per step is host time (Python, dispatch, one op per tensor), which is what the fused
rewrites (``hpuopt/passes/fused_clip_norm.py``, ``hpuopt/passes/fused_adam.py``) and graph
capture exist to remove. Rows, measured in the same run and interleaved (``_common.time_rows``):

    eager for-loop        Adam(foreach=False), clip_grad_norm_(foreach=False); the reference
    eager foreach         Adam(foreach=True),  clip_grad_norm_(foreach=True)
    eager fused           Adam(fused=True),    clip_grad_norm_(foreach=True)
    inductor              torch.compile(step)                      (Adam() defaults, --compiled-opt)
    hpugraph              torch.compile(step, backend="hpugraph")  (the same)
    hpugraph optim.step   the same, but the step calls hpuopt.optim.step(opt) instead of
                          opt.step(): no graph breaks around the update, so the clip and the
                          update are one Dynamo graph instead of three frames, and the CPU
                          group (foreach left to torch) is traced in its foreach form
    hpugraph gf=<name>    the "hpugraph" row (opt.step()) with
                          options={"guard_filter_fn": <filter>} (see GUARD_FILTERS)
    grad refresh only     what every row also does each step: copy the step's gradients in

Every row owns its parameters, gradients and optimizer, all equal at the start. Each call of a
row first copies the next of ``--grad-sets`` pre-drawn gradient sets into its ``.grad`` tensors
(one ``torch._foreach_copy_``; the same sequence for every row, the "grad refresh only" row
times it alone) and then runs its step. The compiled rows are ``torch.compile(...,
isolate_recompiles=True)`` of their own copy of ``step``: without that, Dynamo keeps the entries
of every row on the one code object of ``Adam.step`` (and of its resume functions), and a row
whose guard filter dropped the guards that tell optimizers apart would run another row's graph.

Correctness: after the first call and ``--check-steps`` more steps, every row's parameters and
Adam state are compared with the for-loop row (``assert_close``), and again, with a looser
tolerance (rounding differences compound over thousands of steps), after the timed steps — every
row has then run exactly the same number of steps on the same gradients.

The first call of each compiled row is timed alone (wall and process CPU time), under a budget
of process CPU time (``--compile-budget``, 120 s, for inductor; ``--hpugraph-budget``, 600 s; wall
time may run to 3x that): a first call that runs past it is interrupted and the row recorded as
``"timeout"``; an exception is recorded as ``"error: ..."``. ``--skip-inductor`` leaves the
inductor row out. The first calls run in the table's order (eager rows, the hpugraph rows,
inductor last), so a later compiled row may find some process-wide state (imports, Dynamo's
caches of torch's own functions) already warm.

The goals (``GOAL_*``; evaluated and printed, not asserted) are evaluated for both "hpugraph"
and "hpugraph optim.step", and both of their first calls are taken apart (below).

``--breakdown`` (on by default) then takes one hpugraph step apart, by default the
``hpuopt.optim.step`` form (``--breakdown-of opt.step`` for the ``opt.step()`` form):

* per step: the compiled step; the backend callables Dynamo got, called with the arguments
  Dynamo passed (AOTAutograd's runtime wrapper and below); hpuopt's boxed ``run``; each
  ``PieceRunner``; the CPU runtime's ``replay``; each piece's ATen graph; the same fused kernels
  called directly (what eager ``fused=True`` runs without its Python); and Dynamo alone, through
  a backend whose graphs do nothing, with and without guards (guard evaluation is the
  difference).
* first call: Dynamo tracing, hpuopt's pre- and post-AOT passes (pass by pass), AOTAutograd, the
  first capture, from Dynamo's own compile-time metrics and thin timers around hpuopt's functions.

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
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from overhead import _record_call, _Recorder, _stitch_module  # noqa: E402

import hpuopt  # noqa: E402
import hpuopt.backend  # noqa: E402
import hpuopt.optim  # noqa: E402
import hpuopt.pipeline  # noqa: E402
from hpuopt.runtime.runner import PieceRunner  # noqa: E402

GOAL_VS_FUSED = 1.10  # hpugraph per step at most this many times eager fused=True
GOAL_VS_INDUCTOR = 2.0  # hpugraph at least this many times faster than inductor per step
GOAL_FIRST_CALL_S = 5.0  # hpugraph's first call (compile + capture) under this
# the rows the goals are evaluated for and whose first calls are taken apart: the same step
# written with opt.step() and with hpuopt.optim.step(opt)
GOAL_ROWS = ("hpugraph", "hpugraph optim.step")
# how a row's step calls the optimizer (Row's step_call, --breakdown-of)
STEP_CALLS = ("opt.step", "optim.step")

MAX_NORM = 1.0
LR = 1e-3
WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.01}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# the optimizer options of the compiled rows (--compiled-opt); "default" is what a user writes
COMPILED_OPT: dict[str, dict[str, Any]] = {
    "default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


# -- guard filters ----------------------------------------------------------------------------

_PER_PARAM_SOURCE = re.compile(r"params'?\]?\[\d+\]|\bstate\b|\.state\[|___state")


def drop_per_param_guards_unsafe(entries: list[Any]) -> list[bool]:
    """Keeps every guard except those on one parameter, its gradient or its optimizer state
    (``params[i]``, ``params[i].grad``, ``self.state[...]``): these are the guards whose number
    grows with the parameter count. Hyperparameters (``param_groups[0]['lr']``, betas, ...),
    list lengths, the optimizer's identity and the global state stay guarded. Unsafe: a
    parameter replaced by another of a different shape, or a gradient set to None, goes
    unnoticed."""
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
        return {
            "frames": len(self.frames),
            "guards": sum(f["guards"] for f in self.frames),
            "kept": sum(f["kept"] for f in self.frames),
            "per_frame": self.frames,
        }


# -- the problem ------------------------------------------------------------------------------


class Problem:
    """Parameter sizes, initial values and the gradient sets, all from one seed."""

    def __init__(self, n: int, grad_sets: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.sizes = torch.randint(16, 4097, (n,), generator=g).tolist()
        self.init = [torch.randn(s, generator=g) for s in self.sizes]
        # randn gradients: the total norm is far above 1, so the clip really scales them
        self.grads = [[torch.randn(s, generator=g) for s in self.sizes] for _ in range(grad_sets)]

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def _unique_function(fn: types.FunctionType, tag: str) -> types.FunctionType:
    """``fn`` with a code object of its own (Dynamo keeps its cache on the code object)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class Row:
    """One row: its own parameters, gradients and optimizer, and the callable that is timed.

    ``step_call`` is how the step runs the update: ``"opt.step"`` (``opt.step()``, with
    ``torch.optim``'s graph breaks) or ``"optim.step"`` (``hpuopt.optim.step(opt)``, without)."""

    def __init__(self, name: str, problem: Problem, optim: str, opt_kwargs: dict[str, Any],
                 clip_foreach: bool | None, step_call: str = "opt.step") -> None:
        if step_call not in STEP_CALLS:
            raise ValueError(f"step_call must be one of {STEP_CALLS}, got {step_call!r}")
        self.name = name
        self.step_call = step_call
        self.problem = problem
        self.params = [torch.nn.Parameter(t.clone()) for t in problem.init]
        self.grads = [torch.zeros_like(t) for t in problem.init]
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
        self.step: Callable[[], Any] = _unique_function(fn, re.sub(r"\W", "_", name))
        self.calls = 0
        self.status = "ok"
        self.first_call_s = float("nan")
        self.first_call_cpu_s = float("nan")
        self.census: GuardCensus | None = None

    def refresh(self) -> None:
        torch._foreach_copy_(self.grads, self.problem.grads[self.calls % len(self.problem.grads)])
        self.calls += 1

    def __call__(self) -> None:
        self.refresh()
        self.step()

    def state(self) -> list[torch.Tensor]:
        out = [p.detach() for p in self.params]
        for p in self.params:
            st = self.opt.state[p]
            out += [st["exp_avg"], st["exp_avg_sq"]]
        return out


class RefreshOnly:
    """The gradient copy every row does before its step, timed alone."""

    def __init__(self, reference: Row) -> None:
        self.name = "grad refresh only"
        self.grads = [torch.zeros_like(g) for g in reference.grads]
        self.problem = reference.problem
        self.calls = 0

    def __call__(self) -> None:
        torch._foreach_copy_(self.grads, self.problem.grads[self.calls % len(self.problem.grads)])
        self.calls += 1


def make_rows(problem: Problem, optim: str, args: argparse.Namespace) -> dict[str, Row]:
    rows = {
        "eager for-loop": Row("eager for-loop", problem, optim, {"foreach": False}, False),
        "eager foreach": Row("eager foreach", problem, optim, {"foreach": True}, True),
        "eager fused": Row("eager fused", problem, optim, {"fused": True}, True),
    }
    compiled: dict[str, Row] = {}
    ckw = COMPILED_OPT[args.compiled_opt]
    if not args.skip_inductor:
        r = Row("inductor", problem, optim, ckw, None)
        r.compiled = torch.compile(r.step, isolate_recompiles=True)
        compiled["inductor"] = r
    for name, step_call in (("hpugraph", "opt.step"), ("hpugraph optim.step", "optim.step")):
        r = Row(name, problem, optim, ckw, None, step_call=step_call)
        r.compiled = torch.compile(r.step, backend="hpugraph", isolate_recompiles=True)
        compiled[name] = r
    for gf in args.guard_filters:
        name = f"hpugraph gf={gf}"
        r = Row(name, problem, optim, ckw, None)
        r.census = GuardCensus(GUARD_FILTERS[gf])
        r.compiled = torch.compile(r.step, backend="hpugraph", isolate_recompiles=True,
                                   options={"guard_filter_fn": r.census})
        compiled[name] = r
    for r in compiled.values():
        r.step = r.compiled
    rows.update(compiled)
    return rows


# -- first calls under a budget ---------------------------------------------------------------


class CompileTimeout(BaseException):
    """Raised by SIGALRM inside a first call that ran past its budget (a BaseException, so no
    ``except Exception`` on the way swallows it)."""


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
            row()
    except CompileTimeout:
        row.status = "timeout"
    except Exception as exc:  # a compiler failure is a result too
        row.status = f"error: {type(exc).__name__}: {str(exc)[:300]}"
    row.first_call_s = time.perf_counter() - start
    row.first_call_cpu_s = time.process_time() - cpu


# -- correctness ------------------------------------------------------------------------------


def compare(rows: dict[str, Row], reference: str, rtol: float, atol: float) -> dict[str, Any]:
    ref = rows[reference].state()
    out: dict[str, Any] = {}
    for name, row in rows.items():
        if name == reference or row.status != "ok":
            continue
        got = row.state()
        diff = max((g - r).abs().max().item() for g, r in zip(got, ref))
        try:
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=rtol, atol=atol)
            out[name] = {"ok": True, "max_abs_diff": diff, "steps": row.calls}
        except AssertionError as exc:
            out[name] = {"ok": False, "max_abs_diff": diff, "steps": row.calls,
                         "error": str(exc).splitlines()[0]}
    return out


# -- first-call breakdown ---------------------------------------------------------------------


class FirstCallTimers:
    """Thin timers around hpuopt's compile-time functions, plus Dynamo's own metrics."""

    def __init__(self) -> None:
        self.t: dict[str, float] = Counter()
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, owner: Any, attr: str, key: Callable[..., str]) -> None:
        original = getattr(owner, attr)
        timers = self.t

        @functools.wraps(original)
        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                timers[key(*a, **k)] += time.perf_counter() - start

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def __enter__(self) -> FirstCallTimers:
        from torch._dynamo.utils import compilation_time_metrics

        self._dynamo_before = {k: sum(v) for k, v in compilation_time_metrics.items()}
        self._wrap(hpuopt.backend, "run_pipeline",
                   lambda gm, config, stage, *a, **k: f"pipeline {stage}")
        self._wrap(hpuopt.backend, "compile_aot_graph", lambda *a, **k: "compile_aot_graph")
        self._wrap(PieceRunner, "_miss", lambda *a, **k: "PieceRunner._miss (warm-up + capture)")
        for p in (*hpuopt.pipeline.PRE_AOT, *hpuopt.pipeline.POST_AOT):
            cls = type(p)
            if "run" in cls.__dict__:
                self._wrap(cls, "run", lambda self_, *a, _n=p.name, **k: f"pass {_n}")
        return self

    def __exit__(self, *exc: Any) -> None:
        from torch._dynamo.utils import compilation_time_metrics

        for undo in reversed(self._undo):
            undo()
        self.dynamo = {
            k: sum(v) - self._dynamo_before.get(k, 0.0)
            for k, v in compilation_time_metrics.items()
        }
        self.dynamo = {k: v for k, v in self.dynamo.items() if v > 0}

    def layers(self, total: float) -> list[tuple[str, float]]:
        d = self.dynamo
        user = d.get("OutputGraph.call_user_compiler", 0.0)
        pre = self.t.get("pipeline pre_aot", 0.0)
        aot_graph = self.t.get("compile_aot_graph", 0.0)
        miss = self.t.get("PieceRunner._miss (warm-up + capture)", 0.0)
        out = [
            ("Dynamo: tracing, guards, codegen, Python between graphs (rest)",
             total - user - miss),
            ("hpuopt pre-AOT passes (fused_clip_norm, fused_adam)", pre),
            ("AOTAutograd (backend - pre-AOT passes - compile_aot_graph)", user - pre - aot_graph),
            ("hpuopt compile_aot_graph (post-AOT passes, runners)", aot_graph),
            ("first runs: warm-up + capture (PieceRunner._miss)", miss),
        ]
        return out


# -- per-step breakdown -----------------------------------------------------------------------


def _null_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    out = gm(*example_inputs)
    return lambda *a: out


def bench_breakdown(problem: Problem, optim: str, args: argparse.Namespace) -> dict[str, Any]:
    """Takes one hpugraph step apart (module docstring), the step written as
    ``args.breakdown_of`` says (``"opt.step"`` or ``"optim.step"``). No gradient refresh in
    these rows."""
    seen: list[dict[str, Any]] = []

    def spy_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        fn = hpuopt.backend.hpugraph_backend(gm, example_inputs)
        rec: dict[str, Any] = {"fn": fn, "nodes": len(gm.graph.nodes)}
        seen.append(rec)

        def call(*a: Any) -> Any:
            if "args" not in rec:
                rec["args"] = a
            return fn(*a)

        return call

    ckw = COMPILED_OPT[args.compiled_opt]
    form = args.breakdown_of
    spy = Row("bd hpugraph", problem, optim, ckw, None, step_call=form)
    null = Row("bd null", problem, optim, ckw, None, step_call=form)
    null0 = Row("bd null noguards", problem, optim, ckw, None, step_call=form)
    fused = Row("bd fused", problem, optim, {"fused": True}, True)
    for r in (spy, null, null0, fused):
        r.refresh()
    with _Recorder() as rec:
        spy_step = torch.compile(spy.step, backend=spy_backend, isolate_recompiles=True)
        spy_step()
        spy_step()
    null_step = torch.compile(null.step, backend=_null_backend, isolate_recompiles=True)
    null_step()
    null0_step = torch.compile(null0.step, backend=_null_backend, isolate_recompiles=True,
                               options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    null0_step()

    graphs = []
    for i, (dyn, run, run_args) in enumerate(zip(seen, rec.runs, rec.args)):
        stitch = _stitch_module(run)
        runners = {k: v for k, v in stitch.__dict__.items() if isinstance(v, PieceRunner)}
        pieces = []
        for target, runner in runners.items():
            piece_args = _record_call(stitch.__dict__, target, run, run_args)
            entry = next(iter(runner.entries.values()))
            pieces.append({"target": target, "runner": runner, "args": piece_args,
                           "replay": entry.graph.replay, "gm": runner.gm})
        graphs.append({"fn": dyn["fn"], "args": dyn["args"], "run": run, "run_args": run_args,
                       "pieces": pieces, "dynamo_nodes": dyn["nodes"]})

    def all_graphs(level: str) -> Callable[[], None]:
        calls: list[Callable[[], Any]] = []
        for g in graphs:
            if level == "backend":
                calls.append(functools.partial(g["fn"], *g["args"]))
            elif level == "run":
                calls.append(functools.partial(g["run"], g["run_args"]))
            else:
                for p in g["pieces"]:
                    if level == "runner":
                        calls.append(functools.partial(p["runner"], *p["args"]))
                    elif level == "replay":
                        calls.append(p["replay"])
                    else:
                        calls.append(functools.partial(p["gm"].forward, *p["args"]))

        def go() -> None:
            for c in calls:
                c()

        def go_no_grad() -> None:  # what AOTAutograd's runtime wrapper sets around the graph
            with torch.no_grad():
                for c in calls:
                    c()

        return go if level == "backend" else go_no_grad

    # the fused kernels eager fused=True runs, called directly on the same state
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

    timed = {
        "eager fused step": fused.step,
        "hpugraph step": spy_step,
        "backend callables": all_graphs("backend"),
        "hpuopt run(args)": all_graphs("run"),
        "PieceRunner(*args)": all_graphs("runner"),
        "CpuRuntime replay()": all_graphs("replay"),
        "ATen pieces gm.forward": all_graphs("gm"),
        "fused kernels alone": kernels_only,
        "Dynamo + null backend": null_step,
        "Dynamo + null, no guards": null0_step,
    }
    n = max(2, args.number // 2)
    timings = _common.time_rows(timed, warmup=max(2, args.warmup // 2), repeats=args.repeats,
                                number=n, first_call=False)
    med = {k: t.cpu_median_s for k, t in timings.items()}
    layers = [
        ("Dynamo guard evaluation (null - null without guards)",
         med["Dynamo + null backend"] - med["Dynamo + null, no guards"]),
        ("Dynamo frames + Python outside graphs (null without guards)",
         med["Dynamo + null, no guards"]),
        ("AOTAutograd runtime wrapper (backend - run)",
         med["backend callables"] - med["hpuopt run(args)"]),
        ("hpuopt stitching graph (run - PieceRunner)",
         med["hpuopt run(args)"] - med["PieceRunner(*args)"]),
        ("PieceRunner.__call__: ptr checks, input copies, write-back",
         med["PieceRunner(*args)"] - med["CpuRuntime replay()"]),
        ("CpuRuntime replay emulation (replay - gm.forward)",
         med["CpuRuntime replay()"] - med["ATen pieces gm.forward"]),
        ("ATen pieces (gm.forward) minus the fused kernels alone",
         med["ATen pieces gm.forward"] - med["fused kernels alone"]),
        ("the fused kernels alone (foreach_norm/mul, fused_adam)", med["fused kernels alone"]),
    ]
    layer_sum = sum(s for _, s in layers)
    layers.append(("residual (hpugraph step - sum of the above)", med["hpugraph step"] - layer_sum))
    pieces = []
    for gi, g in enumerate(graphs):
        for p in g["pieces"]:
            r = p["runner"]
            ops = sum(1 for nd in p["gm"].graph.nodes if nd.op == "call_function")
            op_kinds = Counter(str(nd.target) for nd in p["gm"].graph.nodes
                               if nd.op == "call_function").most_common(6)
            pieces.append({"graph": gi, "dynamo_nodes": g["dynamo_nodes"], "piece": p["target"],
                           "ops": ops, "top_ops": op_kinds, "inputs": len(p["args"]),
                           "copied": len(r.plan.copied), "stable": len(r.plan.stable),
                           "mutated": len(r.plan.mutated),
                           "mutated_copied": len(r.plan.mutated_copied)})
    return {"timings": timings, "layers_cpu_s": layers, "pieces": pieces}


def format_layers(layers: list[tuple[str, float]], total: float, unit: str = "ms",
                  title: str = "layer (CPU time per step, medians)") -> str:
    scale = 1e3 if unit == "ms" else 1.0
    lines = [f"{title:<66}{unit:>9}{'%':>7}"]
    for name, s in layers:
        lines.append(f"{name:<66}{s * scale:>9.2f}{100 * s / total:>6.1f}%")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"head": head, "modified": [d.strip() for d in dirty if d.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {}


@functools.cache
def process_warmup() -> float:
    """Compiles a small Linear forward and backward through hpugraph once per process, so the
    first calls timed below do not include what only the first compile of a process pays
    (imports, Dynamo's and AOTAutograd's lazy set-up). Returns the seconds it took then (a
    user's first compile in a fresh process pays them once, on whatever it compiles first)."""
    start = time.perf_counter()
    lin = torch.nn.Linear(8, 8)
    torch.compile(lambda x: lin(x).sum(), backend="hpugraph")(torch.randn(2, 8)).backward()
    seconds = time.perf_counter() - start
    print(f"  process warm-up (first compile in this process): {seconds:.2f}s")
    return seconds


def bench_one(n: int, optim: str, args: argparse.Namespace) -> dict[str, Any]:
    warm_s = process_warmup()
    torch._dynamo.reset()
    hpuopt.reset()
    gc.collect()
    problem = Problem(n, args.grad_sets)
    rows = make_rows(problem, optim, args)
    print(f"\n== {optim}, {n} parameters ({problem.numel} elements, sizes {min(problem.sizes)}.."
          f"{max(problem.sizes)}), load {_common.machine_info()['load_average_1m']:.2f}")

    # first calls: eager rows, then hpugraph rows (the hpuopt.optim.step form first, so that it
    # is the one that meets torch.optim's code cold), inductor last (a timeout there cannot leave
    # half-built Dynamo state under a row still to compile)
    order = [k for k in rows if k not in ("inductor", "hpugraph optim.step")]
    first_hpu = order.index("hpugraph")
    order.insert(first_hpu, "hpugraph optim.step")
    order += ["inductor"] if "inductor" in rows else []
    fc_breakdowns: dict[str, FirstCallTimers] = {}
    for name in order:
        row = rows[name]
        budget = args.compile_budget if name == "inductor" else args.hpugraph_budget
        if name in GOAL_ROWS:
            with FirstCallTimers() as fct:
                first_call(row, budget)
            fc_breakdowns[name] = fct
        else:
            first_call(row, budget)
        print(f"  first call {name:<24} {row.first_call_s:8.2f}s wall {row.first_call_cpu_s:8.2f}s cpu"
              f"  {row.status}", flush=True)
    live = {k: r for k, r in rows.items() if r.status == "ok"}
    for _ in range(args.check_steps):
        for r in live.values():
            r()
    early = compare(rows, "eager for-loop", rtol=1e-5, atol=1e-5)

    refresh = RefreshOnly(rows["eager for-loop"])
    for _ in range(rows["eager for-loop"].calls):
        refresh()
    timed: dict[str, Callable[[], Any]] = {k: r for k, r in live.items()}
    timed["grad refresh only"] = refresh
    timings = _common.time_rows(timed, warmup=args.warmup, repeats=args.repeats,
                                number=args.number, first_call=False)
    for name, row in rows.items():  # put the first calls measured above into the table
        if name in timings:
            timings[name].first_call_s = row.first_call_s
    late = compare(rows, "eager for-loop", rtol=1e-3, atol=1e-4)

    title = f"{optim}: clip_grad_norm_ + step, {n} params, per step incl. the grad refresh"
    print()
    print(_common.format_table(timings, "eager fused", title))
    for kind, res in (("after first call + check steps", early), ("after all timed steps", late)):
        bad = {k: v for k, v in res.items() if not v["ok"]}
        worst = max((v["max_abs_diff"] for v in res.values()), default=0.0)
        print(f"check vs eager for-loop {kind}: "
              f"{'all rows match' if not bad else 'MISMATCH in ' + ', '.join(bad)} "
              f"(max abs diff {worst:.2e})")
    for name, row in rows.items():
        if row.status != "ok":
            print(f"  {name}: {row.status} after {row.first_call_s:.1f}s")

    result: dict[str, Any] = {
        "params": n, "optimizer": optim, "numel": problem.numel,
        "sizes_min_max": [min(problem.sizes), max(problem.sizes)],
        "load_average_1m_start": _common.machine_info()["load_average_1m"],
        "rows": _common.ratio_rows(timings, "eager fused"),
        "process_warmup_s": warm_s,
        "first_call_s": {k: r.first_call_s for k, r in rows.items()},
        "first_call_cpu_s": {k: r.first_call_cpu_s for k, r in rows.items()},
        "status": {k: r.status for k, r in rows.items()},
        "check_early": early, "check_late": late,
        "guards": {k: r.census.summary() for k, r in rows.items() if r.census is not None},
    }
    for k, g in result["guards"].items():
        print(f"  guards {k:<24} {g['guards']:>7} in {g['frames']} frames, kept {g['kept']}")

    # goals (evaluated, not asserted), on CPU-time medians with the grad refresh taken out
    verdicts = []
    ref_s = timings["grad refresh only"].cpu_median_s
    step_s = {k: t.cpu_median_s - ref_s for k, t in timings.items() if k != "grad refresh only"}
    result["step_only_cpu_s"] = step_s
    ind = rows.get("inductor")
    for gname in GOAL_ROWS:
        hrow = rows[gname]
        if gname in step_s:
            r_fused = step_s[gname] / step_s["eager fused"]
            verdicts.append({"row": gname,
                             "goal": f"{gname} <= {GOAL_VS_FUSED}x eager fused per step",
                             "value": r_fused, "met": r_fused <= GOAL_VS_FUSED})
            goal = f"{gname} >= {GOAL_VS_INDUCTOR}x faster than inductor"
            if "inductor" in step_s:
                sp = step_s["inductor"] / step_s[gname]
                verdicts.append({"row": gname, "goal": goal, "value": sp,
                                 "met": sp >= GOAL_VS_INDUCTOR})
            elif ind is not None:
                verdicts.append({"row": gname, "goal": goal, "value": None, "met": None,
                                 "note": f"inductor {ind.status}"})
        else:
            verdicts.append({"row": gname, "goal": f"{gname} per step", "value": None,
                             "met": None, "note": hrow.status})
        verdicts.append({"row": gname, "goal": f"{gname} first call < {GOAL_FIRST_CALL_S}s (wall)",
                         "value": hrow.first_call_s,
                         "met": hrow.first_call_s < GOAL_FIRST_CALL_S})
        verdicts.append({"row": gname, "goal": f"{gname} first call < {GOAL_FIRST_CALL_S}s (cpu)",
                         "value": hrow.first_call_cpu_s,
                         "met": hrow.first_call_cpu_s < GOAL_FIRST_CALL_S})
    print("per step without the grad refresh (cpu): " + ", ".join(
        f"{k} {_common._fmt_s(v)}" for k, v in step_s.items()))
    for v in verdicts:
        val = "-" if v["value"] is None else f"{v['value']:.2f}"
        met = {True: "met", False: "NOT met", None: "not measured"}[v["met"]]
        note = f" ({v['note']})" if "note" in v else ""
        print(f"goal {v['goal']}: {val} -> {met}{note}")
    result["goals"] = verdicts

    # the first calls of both hpugraph rows taken apart, keyed by row name
    result["first_call_breakdown"] = {}
    for gname, fct in fc_breakdowns.items():
        hrow = rows[gname]
        if hrow.status != "ok":
            continue
        layers = fct.layers(hrow.first_call_s)
        print()
        print(format_layers(layers, hrow.first_call_s, unit="s",
                            title=f"{gname} first call (wall)"))
        passes = {k: v for k, v in fct.t.items() if k.startswith("pass ")}
        print("  passes: " + ", ".join(f"{k[5:]} {v:.2f}s" for k, v in passes.items()))
        top = sorted(fct.dynamo.items(), key=lambda kv: -kv[1])[:12]
        print("  Dynamo metrics: " + ", ".join(f"{k} {v:.2f}s" for k, v in top))
        result["first_call_breakdown"][gname] = {
            "layers_s": dict(layers), "hpuopt_timers_s": dict(fct.t),
            "dynamo_metrics_s": fct.dynamo,
        }
    result["explain"] = str(hpuopt.explain())

    if args.breakdown:
        del rows, live, timed
        torch._dynamo.reset()
        gc.collect()
        bd = bench_breakdown(problem, optim, args)
        total = bd["timings"]["hpugraph step"].cpu_median_s
        form = ("hpuopt.optim.step(opt)" if args.breakdown_of == "optim.step"
                else "opt.step()")
        print()
        print(_common.format_table(
            bd["timings"], "eager fused step",
            f"breakdown of one hpugraph step written with {form}, {n} params (no grad refresh)"))
        print()
        print(format_layers(bd["layers_cpu_s"], total,
                            title=f"layer, {form} step (CPU time per step, medians)"))
        for p in bd["pieces"]:
            print(f"  graph {p['graph']} ({p['dynamo_nodes']} Dynamo nodes) {p['piece']}: "
                  f"{p['ops']} ATen ops {p['top_ops'][:4]}; inputs {p['inputs']}: copied "
                  f"{p['copied']}, stable {p['stable']}, mutated {p['mutated']} "
                  f"(written back {p['mutated_copied']})")
        result["breakdown"] = {
            "step_call": args.breakdown_of,
            "rows": _common.ratio_rows(bd["timings"], "eager fused step"),
            "layers_cpu_s": dict(bd["layers_cpu_s"]),
            "pieces": bd["pieces"],
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, nargs="+", default=[100, 1000])
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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grad-sets", type=int, default=4)
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None, help="default: by parameter count")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--number", type=int, default=None,
                   help="calls per repeat; default max(3, 1000 // params)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--breakdown-of", choices=STEP_CALLS, default="optim.step",
                   help="which form of the hpugraph step --breakdown takes apart: "
                        "hpuopt.optim.step(opt) (optim.step, the default) or opt.step()")
    p.add_argument("--quick", action="store_true", help="N = 20, few repeats, no JSON")
    p.add_argument("--name", default="optimizer", help="results/<name>-cpu.json")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.repeats = [20], 3
        args.number, args.warmup = args.number or 5, args.warmup or 2

    if not args.keep_compile_caches:
        # a first call that hits inductor's on-disk caches (filled by an earlier run) is not a
        # first call: compile into a fresh directory with the FX-graph/AOT caches off
        import os
        import tempfile

        import torch._functorch.config
        import torch._inductor.config

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="optimizer-bench-")
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    warnings.filterwarnings("ignore", message="hpuopt: .* runs uncaptured")
    warnings.filterwarnings("ignore", message=".*Profiler record function.*")
    threads = _common.set_threads(args.threads)
    machine = _common.machine_info("cpu")
    print(f"optimizer: clip_grad_norm_({MAX_NORM}) + {'/'.join(args.optim)} over "
          f"{args.params} params, {threads} thread(s), torch {torch.__version__}, "
          f"{machine['cpu_model']}, load {machine['load_average_1m']:.2f}")
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "optimizer", "machine": machine, "config": vars(args).copy(),
        "git": _git_state(),
        "goals": {"max_ratio_vs_eager_fused": GOAL_VS_FUSED,
                  "min_speedup_vs_inductor": GOAL_VS_INDUCTOR,
                  "max_first_call_s": GOAL_FIRST_CALL_S},
        "runs": [],
    }
    for optim in args.optim:
        for n in args.params:
            a = argparse.Namespace(**vars(args))
            a.number = args.number or max(3, 1000 // n)
            a.warmup = args.warmup if args.warmup is not None else max(3, 300 // n)
            result["runs"].append(bench_one(n, optim, a))
    result["elapsed_s"] = time.perf_counter() - started
    result["machine"]["load_average_1m_end"] = _common.machine_info()["load_average_1m"]
    print(f"\nelapsed {result['elapsed_s']:.0f}s, load at the end "
          f"{result['machine']['load_average_1m_end']:.2f}")
    if not args.quick:
        path = _common.write_results(args.name, "cpu", result)
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
