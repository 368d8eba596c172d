"""Piece compilers on the CPU: eager vs torch.compile's default vs hpugraph vs hpugraph with
``piece_compiler="inductor"``, in one run.

Scenarios (float32, ``torch.no_grad()`` except the optimizer step; details in
``benchmarks/README.md``):

    mlp        ``--blocks`` x (Linear + GELU + LayerNorm), hidden ``--hidden``, batch 1: static.
    masked     an MLP, a boolean-mask row selection (``h[h.norm(dim=-1) > thr]``), an MLP, sum,
               through ``hpuopt.compile``; inputs rotate over ``--masked-sets`` sets so the
               number of selected rows changes from call to call.
    varbatch   an MLP called with every batch size 1..``--max-batch`` in a shuffled order
               (``dynamic=True``): compilations, the first pass over all sizes, per step after.
    optimizer  ``clip_grad_norm_`` + Adam over ``--params`` parameter tensors
               (``benchmarks/optimizer.py``'s problem), the hpugraph rows through
               ``hpuopt.optim.step(opt)``.

Rows: eager; ``torch.compile`` (Inductor, default options); hpugraph (pieces captured as their
ATen ops); hpugraph inductor (``piece_compiler="inductor"``); varbatch splits the last into
per-bucket and symbolic compiles (``compile_dynamic``); the optimizer adds eager fused and a
row that forces Inductor on the fused kernel. Every compiled row's first call is timed alone,
with a fresh Inductor cache (``torch._inductor.utils.fresh_cache``) unless
``--keep-compile-caches``; compilations and compile seconds are hpuopt's counters. Rows are
checked against eager. Goals are printed and written, never asserted.

    python benchmarks/piece_compilers.py             # results/piece_compilers-cpu.json
    python benchmarks/piece_compilers.py --quick     # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import random
import re
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import harness
import torch
from harness import Goal, Row

# hpuopt from this checkout: importing harness put it first on sys.path
import hpuopt
import hpuopt.optim
from hpuopt.runtime import compilers

GOAL_MLP_VS_EAGER = 0.5  # hpugraph inductor per call at most this times eager
GOAL_MLP_VS_COMPILE = 1.15  # ... and at most this times torch.compile's default
GOAL_MASKED_VS_COMPILE = 1.0  # masked model: hpuopt.compile inductor at most torch.compile's
GOAL_FIRST_CALL_S = 5.0  # optimizer step: first call of hpugraph inductor under this
SCENARIOS = ("mlp", "masked", "varbatch", "optimizer")
IND = {"piece_compiler": "inductor"}
DIRECT = {"runtime": "direct"}  # no capture: on the CPU, what runs fastest (the goals' rows)


@contextlib.contextmanager
def fresh_inductor_cache(enabled: bool) -> Iterator[None]:
    """A clean Inductor cache directory and in-memory caches for one row's set-up, so its first
    call compiles as on a fresh machine (no kernels from an earlier row or run)."""
    if not enabled:
        yield
        return
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    with fresh():
        yield


class Compiles:
    """hpuopt's piece compilations and Dynamo frames over a row's set-up, in its ``info``."""

    def __init__(self, fresh: bool) -> None:
        self.fresh = fresh

    @contextlib.contextmanager
    def __call__(self, row: Row) -> Iterator[None]:
        gc.collect()
        before, frames = hpuopt.counters.snapshot(), harness.dynamo_frames()
        with fresh_inductor_cache(self.fresh and row.kind == "inductor"):
            yield
        d = hpuopt.counters.delta(before)
        row.info.update(first_call_s=row.first_call_s, first_call_cpu_s=row.first_call_cpu_s,
                        dynamo_frames=harness.dynamo_frames() - frames,
                        piece_compiles=int(d["piece_compiles"]),
                        compile_seconds=d["compile_seconds"],
                        compile_fallbacks=int(d["compile_fallbacks"]),
                        graphs_captured=int(d["graphs_captured"]))
        if row.status == "ok":
            print(f"  [{row.name}] first call {row.first_call_s:.2f}s"
                  + (f", {row.info['piece_compiles']} piece compiles "
                     f"({row.info['compile_seconds']:.2f}s)" if row.info["piece_compiles"]
                     else ""), flush=True)


class CountingInductor:
    """torch.compile's default backend (Inductor's ``compile_fx``), counting its compiles."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs)


def isolated(model: torch.nn.Module, tag: str) -> torch.nn.Module:
    """A copy of ``model`` whose ``forward`` has a code object of its own.

    Dynamo keeps compiled entries on the code object: rows compiling copies of one model
    would share one cache, and each call would first try the guards of the rows compiled
    after it, which makes a row's time depend on the order the rows were built."""
    m = copy.deepcopy(model)
    cls = type(m)
    fn = cls.forward
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{re.sub(r'[^0-9A-Za-z]', '_', tag)}")
    forward = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                 fn.__closure__)
    m.__class__ = type(f"{cls.__name__}_{len(tag)}", (cls,), {"forward": forward})
    return m


def model_rows(model: torch.nn.Module, *, api: bool = False, dynamic: bool | None = None,
               counting: CountingInductor | None = None) -> list[Row]:
    """eager, torch.compile, hpugraph, hpugraph inductor (the CPU runtime's emulated capture),
    hpugraph inductor direct (``runtime="direct"``); each builds its own copy."""

    def build(kind: str, **kw: Any) -> Callable[[], Any]:
        def make() -> Any:
            m = isolated(model, f"{kind}_{'_'.join(map(str, kw.values()))}")
            if kind == "inductor":
                backend = counting if counting is not None else "inductor"
                return torch.compile(m, backend=backend, dynamic=dynamic)
            if api:
                return hpuopt.compile(m, dynamic=dynamic, **kw)
            return torch.compile(m, backend="hpugraph", dynamic=dynamic, options=kw)
        return make

    hp = "hpuopt.compile" if api else "hpugraph"
    return [Row("eager", build=lambda: model),
            Row("torch.compile", build=build("inductor"), kind="inductor"),
            Row(hp, build=build("hpugraph"), kind="hpugraph"),
            Row(f"{hp} inductor", build=build("hpugraph", **IND), kind="inductor"),
            Row(f"{hp} inductor direct", build=build("hpugraph", **IND, **DIRECT),
                kind="inductor")]


def bind(rows: list[Row], call: Callable[[Any], Callable[[], Any]],
         check: Callable[[Any], float]) -> None:
    """Turns each row's model-building ``build`` into one building its call ``call(model)``;
    ``check(model)`` is stored as the row's check (max |diff| from eager)."""
    for row in rows:
        make = row.build
        assert make is not None
        models: dict[str, Any] = {}

        def built(row: Row = row, make: Callable[[], Any] = make, models: dict = models) -> Any:
            models["m"] = make()
            return call(models["m"])

        row.build = built
        row.check = lambda models=models: check(models["m"])


def run(rows: list[Row], args: argparse.Namespace, title: str, *, number: int,
        divisor: int = 1) -> dict[str, harness.Timing]:
    live = harness.set_up(rows, warmup=args.warmup, setup=Compiles(not args.keep_compile_caches))
    timings = harness.measure(live, repeats=args.repeats, number=number, divisor=divisor)
    for row in live:
        if row.check is not None:
            with torch.no_grad():
                row.info["max_abs_diff"] = float(row.check())
    print("\n" + harness.format_table(timings, "eager", title, rows=rows, columns=[
        ("compiles", 10, lambda r: str(r.info.get("piece_compiles", "-"))),
        ("max|diff|", 11, lambda r: f"{r.info['max_abs_diff']:.1e}"
         if "max_abs_diff" in r.info else "-")]))
    return timings


def ratio(timings: dict[str, harness.Timing], a: str, b: str) -> float | None:
    """Row ``a``'s per-call wall median over row ``b``'s."""
    if a in timings and b in timings:
        return timings[a].median_s / timings[b].median_s
    return None


def section(rows: list[Row], timings: dict[str, harness.Timing], goals: list[Goal],
            **extra: Any) -> dict[str, Any]:
    return {"rows": harness.rows_json(timings, "eager", rows),
            "first_call_s": {r.name: r.first_call_s for r in rows},
            "goals": harness.report_goals(goals), **extra}


# -- the scenarios --------------------------------------------------------------------------------


def bench_mlp(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for hidden in args.mlp_hidden:
        print(f"\n-- hidden {hidden}")
        torch._dynamo.reset()
        out[str(hidden)] = bench_mlp_one(args, hidden)
    return out


def bench_mlp_one(args: argparse.Namespace, hidden: int) -> dict[str, Any]:
    model = harness.make_mlp(args.blocks, hidden).eval()
    x = torch.randn(1, hidden)
    with torch.no_grad():
        expected = model(x)
    rows = model_rows(model)
    bind(rows, lambda m: (lambda: m(x)), lambda m: (m(x) - expected).abs().max().item())
    with torch.no_grad():
        t = run(rows, args, f"mlp: {args.blocks} blocks, hidden {hidden}, batch 1",
                number=args.number)
    best = "hpugraph inductor direct"
    goals = [
        Goal(f"{best} <= {GOAL_MLP_VS_EAGER}x eager per call",
             ratio(t, best, "eager"), "<=", GOAL_MLP_VS_EAGER, row=best),
        Goal(f"{best} <= {GOAL_MLP_VS_COMPILE}x torch.compile per call",
             ratio(t, best, "torch.compile"), "<=", GOAL_MLP_VS_COMPILE, row=best),
        Goal("torch.compile <= 0.5x eager per call (what the first goal presumes)",
             ratio(t, "torch.compile", "eager"), "<=", GOAL_MLP_VS_EAGER, row="torch.compile"),
    ]
    return section(rows, t, goals, blocks=args.blocks, hidden=hidden)


class Masked(torch.nn.Module):
    """An MLP, the rows whose norm exceeds ``thr``, an MLP, a sum."""

    def __init__(self, blocks: int, hidden: int) -> None:
        super().__init__()
        self.first = harness.make_mlp(blocks, hidden, seed=1).append(
            torch.nn.Linear(hidden, hidden))
        self.second = harness.make_mlp(blocks, hidden, seed=2)
        self.thr = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.second(h[h.norm(dim=-1) > self.thr]).sum(0)


def bench_masked(args: argparse.Namespace) -> dict[str, Any]:
    model = Masked(args.masked_blocks, args.hidden).eval()
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(args.masked_batch, args.hidden, generator=gen)
          for _ in range(args.masked_sets)]
    with torch.no_grad():
        norms = torch.cat([model.first(x).norm(dim=-1) for x in xs]).sort().values
        k = len(norms) // 2  # about half the rows pass, none of them close to the threshold
        model.thr = float(norms[k - 1] + norms[k]) / 2
        expected = [model(x) for x in xs]
        selected = [int((model.first(x).norm(dim=-1) > model.thr).sum()) for x in xs]

    def call(m: Any) -> Callable[[], Any]:
        state = {"i": 0}

        def one() -> Any:
            state["i"] = (state["i"] + 1) % len(xs)
            return m(xs[state["i"]])
        return one

    def check(m: Any) -> float:
        return max((m(x) - e).abs().max().item() for x, e in zip(xs, expected))

    rows = model_rows(model, api=True)
    bind(rows, call, check)
    with torch.no_grad():
        t = run(rows, args, f"masked: MLP -> h[mask] -> MLP, batch {args.masked_batch}, "
                f"{args.masked_sets} input sets", number=args.number)
    best = "hpuopt.compile inductor direct"
    goals = [Goal(f"{best} <= {GOAL_MASKED_VS_COMPILE}x torch.compile per call",
                  ratio(t, best, "torch.compile"), "<=", GOAL_MASKED_VS_COMPILE, row=best)]
    return section(rows, t, goals, selected_rows_per_set=selected, blocks=args.masked_blocks)


def bench_varbatch(args: argparse.Namespace) -> dict[str, Any]:
    model = harness.make_mlp(args.vb_blocks, args.hidden, seed=4).eval()
    sizes = list(range(1, args.max_batch + 1))
    random.Random(0).shuffle(sizes)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(b, args.hidden, generator=gen) for b in sizes]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    buckets = len({1 << (b - 1).bit_length() for b in sizes})
    counting = CountingInductor()
    rows = model_rows(model, dynamic=True, counting=counting)
    per_bucket = rows[3]
    per_bucket.name = "hpugraph inductor per-bucket"
    symbolic = copy.copy(per_bucket)
    symbolic.name, symbolic.info = "hpugraph inductor symbolic", {}

    def build_with(dynamic: bool) -> Callable[[], Any]:
        def make() -> Any:
            return torch.compile(isolated(model, f"dyn{dynamic}"), backend="hpugraph", dynamic=True,
                                 options={**IND, "compile_dynamic": dynamic})
        return make

    per_bucket.build, symbolic.build = build_with(False), build_with(True)
    rows.insert(4, symbolic)

    def one_pass(m: Any) -> Callable[[], None]:
        def go() -> None:
            for x in xs:
                m(x)
        return go

    bind(rows, one_pass,
         lambda m: max((m(x) - e).abs().max().item() for x, e in zip(xs, expected)))
    with torch.no_grad():
        t = run(rows, args, f"varbatch: {args.vb_blocks} blocks, batch 1..{args.max_batch} "
                "shuffled, per step (the first call is the first pass over every size)",
                number=1, divisor=len(xs))
    compiles = {r.name: r.info.get("piece_compiles") for r in rows}
    compiles["torch.compile"] = counting.compiles
    print("compilations: " + ", ".join(f"{k} {v}" for k, v in compiles.items()))
    goals = [Goal(f"{name}: compilations <= buckets ({buckets})", compiles[name], "<=",
                  buckets, row=name)
             for name in ("hpugraph inductor per-bucket", "hpugraph inductor symbolic",
                          "hpugraph inductor direct")]
    return section(rows, t, goals, sizes=sizes, buckets=buckets, compilations=compiles)


def bench_optimizer(args: argparse.Namespace) -> dict[str, Any]:
    import optimizer as opt_bench

    problem = opt_bench.Problem(args.params, 4)

    def forced(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        """Inductor even on a fused optimizer kernel (in its functional form)."""
        compilers.functional_fused_kernels(gm)
        return compilers.INDUCTOR.fn(gm, example_inputs)  # type: ignore[misc]

    def step(name: str, opt_kwargs: dict[str, Any], clip_foreach: bool | None,
             call: str = "opt.step", **compile_kw: Any) -> Callable[[], Any]:
        def make() -> Any:
            s = opt_bench.Step(problem, "adam", opt_kwargs, clip_foreach, call, tag=name)
            return s.compile(**compile_kw) if compile_kw else s
        return make

    rows = [
        Row("eager", build=step("eager", {"foreach": False}, False)),
        Row("eager fused", build=step("eager fused", {"fused": True}, True)),
        Row("torch.compile", build=step("torch.compile", {}, None, backend="inductor"),
            kind="inductor"),
        Row("hpugraph", build=step("hpugraph", {}, None, "optim.step", backend="hpugraph"),
            kind="hpugraph"),
        Row("hpugraph inductor", build=step("hpugraph inductor", {}, None, "optim.step",
                                            backend="hpugraph", options=IND), kind="inductor"),
        Row("hpugraph inductor forced on the fused kernel",
            build=step("forced", {}, None, "optim.step", backend="hpugraph",
                       options={"piece_compiler": forced}), kind="inductor"),
    ]
    steppers: dict[str, Any] = {}
    for row in rows:
        make = row.build

        def built(row: Row = row, make: Callable[[], Any] = make) -> Any:
            steppers[row.name] = make()
            return steppers[row.name]

        row.build = built
    live = harness.set_up(rows, warmup=args.opt_warmup,
                          setup=Compiles(not args.keep_compile_caches))
    refresh = opt_bench.Grads(problem)
    timings = harness.measure([*live, Row("grad refresh only", refresh.refresh)],
                              repeats=args.repeats, number=args.opt_number)
    ref = steppers["eager"]
    for row in live:
        s = steppers[row.name]
        diff = max((a - b).abs().max().item() for a, b in zip(s.state(), ref.state()))
        calls_apart = s.calls - ref.calls
        row.info.update(max_abs_diff_vs_eager=diff, calls_vs_eager=calls_apart)
    print("\n" + harness.format_table(
        timings, "eager", f"optimizer: clip_grad_norm_ + Adam, {args.params} params, per step "
        "incl. the grad refresh", rows=[*rows, Row("grad refresh only")], columns=[
            ("compiles", 10, lambda r: str(r.info.get("piece_compiles", "-")))]))
    refresh_s = timings["grad refresh only"].median_s
    step_s = {k: t.median_s - refresh_s for k, t in timings.items() if k != "grad refresh only"}
    print("per step without the grad refresh (wall): "
          + ", ".join(f"{k} {harness.fmt_s(v)}" for k, v in step_s.items()))
    goals = [
        Goal("hpugraph inductor per step <= torch.compile per step (warm caches)",
             step_s.get("hpugraph inductor", float("nan")) / step_s["torch.compile"]
             if "torch.compile" in step_s else None, "<=", 1.0, row="hpugraph inductor"),
        Goal(f"hpugraph inductor first call < {GOAL_FIRST_CALL_S}s",
             rows[4].first_call_s, "<", GOAL_FIRST_CALL_S, row="hpugraph inductor"),
    ]
    return {"rows": harness.rows_json(timings, "eager", [*rows, Row("grad refresh only")]),
            "first_call_s": {r.name: r.first_call_s for r in rows},
            "step_only_wall_s": step_s, "params": args.params, "numel": problem.numel,
            "goals": harness.report_goals(goals)}


# -- main -------------------------------------------------------------------------------------


def process_warmup() -> float:
    """One tiny compile through hpugraph with Inductor pieces and one through torch.compile,
    so no row pays the first compile of the process (imports, lazy set-up)."""
    start = time.perf_counter()
    lin = torch.nn.Linear(8, 8)
    with fresh_inductor_cache(True), torch.no_grad():
        torch.compile(lin, backend="hpugraph", options=IND)(torch.randn(2, 8))
        torch.compile(copy.deepcopy(lin))(torch.randn(2, 8))
    torch._dynamo.reset()
    hpuopt.reset()
    return time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__, name="piece_compilers", warmup=20, repeats=15, number=100)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256, help="masked and varbatch models")
    p.add_argument("--mlp-hidden", type=int, nargs="+", default=[256, 128],
                   help="the MLP's hidden sizes (one table each)")
    p.add_argument("--masked-blocks", type=int, default=4)
    p.add_argument("--masked-batch", type=int, default=32)
    p.add_argument("--masked-sets", type=int, default=8)
    p.add_argument("--vb-blocks", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--params", type=int, default=100)
    p.add_argument("--opt-number", type=int, default=10, help="optimizer steps per repeat")
    p.add_argument("--opt-warmup", type=int, default=3)
    p.add_argument("--keep-compile-caches", action="store_true",
                   help="let Inductor use its on-disk caches (first calls then depend on "
                        "earlier runs and rows)")
    args = p.parse_args(argv)
    harness.quick(p, args, repeats=2, number=3, warmup=1, blocks=2, hidden=32, mlp_hidden=[32],
                  masked_blocks=1,
                  masked_batch=8, masked_sets=2, vb_blocks=1, max_batch=6, params=4,
                  opt_number=2, opt_warmup=1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = harness.start(args)
    harness.raise_dynamo_limits()
    started = time.perf_counter()
    print(f"piece compilers: {', '.join(args.scenarios)}, {args.threads} thread(s), torch "
          f"{torch.__version__}, {machine['cpu_model']}, load {harness.load_average() or 0:.2f}")
    result = harness.result_header("piece_compilers", args, machine)
    result["process_warmup_s"] = process_warmup()
    result["fresh_inductor_cache_per_row"] = not args.keep_compile_caches
    result["goal_thresholds"] = {
        "mlp_max_ratio_vs_eager": GOAL_MLP_VS_EAGER,
        "mlp_max_ratio_vs_torch_compile": GOAL_MLP_VS_COMPILE,
        "masked_max_ratio_vs_torch_compile": GOAL_MASKED_VS_COMPILE,
        "optimizer_max_first_call_s": GOAL_FIRST_CALL_S}
    bench = {"mlp": bench_mlp, "masked": bench_masked, "varbatch": bench_varbatch,
             "optimizer": bench_optimizer}
    for name in args.scenarios:
        print(f"\n== {name}, load {harness.load_average() or 0:.2f}")
        torch._dynamo.reset()
        hpuopt.reset()
        gc.collect()
        result[name] = bench[name](args)
    harness.finish(result, args, "cpu", started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
