"""Per-call overhead of the hpugraph backend on a host-bound model, against eager and aot_eager.

``--blocks`` blocks of Linear + GELU + LayerNorm (``--hidden`` wide) at batch 1 on the CPU: every
op is tiny, so a call is host time, which is what hpuopt exists to remove. Scenarios (see
``benchmarks/README.md``): inference under ``torch.no_grad()`` (eager, aot_eager, hpugraph,
hpuopt.compile, hpugraph capture=off); a training step (``--no-train`` skips it); and the
breakdown of one hpugraph call into its layers (``--no-breakdown`` skips it).

Each compiled row gets its own deep copy of the model: ``torch.compile`` of a ``torch.nn.*``
container goes through one shared wrapper code object, so compiling the *same* module object
with several backends stacks their cache entries on one frame and inflates the last row.

    python benchmarks/overhead.py            # full run, writes benchmarks/results/overhead-cpu.json
    python benchmarks/overhead.py --quick    # a smoke run (fewer repeats), writes nothing
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from typing import Any

import harness
import torch
from harness import LEVELS

# hpuopt from this checkout: importing harness put it first on sys.path
import hpuopt
from hpuopt.api import DYNAMIC_OP_FLAGS

GOAL = 1.10  # hpugraph's default CPU path: at most this many times eager per call


def compiled_rows(model: torch.nn.Module, capture_off: bool = True) -> dict[str, Any]:
    """The rows' callables; every compiled one on its own copy of ``model`` (module docstring)."""
    rows = {
        "eager": model,
        "aot_eager": torch.compile(copy.deepcopy(model), backend="aot_eager"),
        "hpugraph": torch.compile(copy.deepcopy(model), backend="hpugraph"),
        "hpuopt.compile": hpuopt.compile(copy.deepcopy(model)),
    }
    if capture_off:
        rows["hpugraph capture=off"] = torch.compile(
            copy.deepcopy(model), backend="hpugraph", options={"capture": False})
    return rows


def bench_inference(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    model.eval()
    x = torch.randn(args.batch, args.hidden)
    fns = compiled_rows(model)
    with torch.no_grad():
        expected = model(x)
        rows = {name: functools.partial(fn, x) for name, fn in fns.items()}
        timings = harness.time_rows(rows, warmup=args.warmup, repeats=args.repeats,
                                    number=args.number)
        frames_before = harness.dynamo_frames()
        hpu_before = hpuopt.counters.snapshot()
        for name, fn in fns.items():  # the answer is still right after all the replays
            torch.testing.assert_close(fn(x), expected, rtol=1e-5, atol=1e-5, msg=name)
    recompiles = harness.dynamo_frames() - frames_before
    delta = hpuopt.counters.delta(hpu_before)
    if recompiles or delta["recaptures"] or delta["graphs_captured"]:
        raise AssertionError(f"timed calls compiled or captured again: {recompiles}, {delta}")
    return {"timings": timings, "explain": str(fns["hpuopt.compile"].explain())}


def bench_training(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    model.train()
    x = torch.randn(args.batch, args.hidden)
    fns = compiled_rows(model, capture_off=False)

    def step(fn: Any) -> None:
        for p in fn.parameters():
            p.grad = None
        fn(x).sum().backward()

    rows = {name: functools.partial(step, fn) for name, fn in fns.items()}
    timings = harness.time_rows(rows, warmup=args.warmup, repeats=max(5, args.repeats // 2),
                                number=max(10, args.number // 4))
    ref = [p.grad for p in model.parameters()]
    for name, fn in fns.items():
        for r, g in zip(ref, [p.grad for p in fn.parameters()]):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)
    before = hpuopt.counters.snapshot()  # what one hpugraph step copies, clones and lends
    step(fns["hpugraph"])
    delta = hpuopt.counters.delta(before)
    per_step = {k: delta[k] for k in ("static_copies", "output_clones", "outputs_lent",
                                      "lent_copies")}
    return {"timings": timings, "per_step": per_step}


def bench_training_layers(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    """Where one hpugraph training step's runtime time goes, per graph (forward, backward):
    the piece runners' calls, the replays inside them, and the difference (the runtime's own
    bookkeeping: key, address check, lending, clones), medians over timed steps. Timers wrap
    the runner's call and the CPU runtime's replay (``hpuopt.runtime.cpu._replay``), so this
    row times a model of its own."""
    from unittest import mock

    from hpuopt.runtime import cpu as cpu_runtime
    from hpuopt.runtime.runner import PieceRunner

    calls: list[tuple[str, int]] = []
    make_replay, runner_call = cpu_runtime._replay, PieceRunner.__call__

    def timed_replay(*a: Any, **k: Any) -> Any:
        replay = make_replay(*a, **k)

        def run() -> None:
            start = time.perf_counter_ns()
            replay()
            calls.append(("replay", time.perf_counter_ns() - start))
        return run

    def timed_call(self: PieceRunner, *a: Any) -> Any:
        start = time.perf_counter_ns()
        out = runner_call(self, *a)
        calls.append(("runner", time.perf_counter_ns() - start))
        return out

    model.train()
    x = torch.randn(args.batch, args.hidden)
    with mock.patch.object(cpu_runtime, "_replay", timed_replay), \
            mock.patch.object(PieceRunner, "__call__", timed_call):
        fn = torch.compile(copy.deepcopy(model), backend="hpugraph")
        steps = max(50, args.number)
        for i in range(args.warmup + steps):
            if i == args.warmup:
                calls.clear()
            for p in fn.parameters():
                p.grad = None
            fn(x).sum().backward()
    out: dict[str, Any] = {}
    for g, graph in enumerate(("forward", "backward")):  # one piece each: fw, bw alternate
        runner = [t for kind, t in calls if kind == "runner"][g::2]
        replay = [t for kind, t in calls if kind == "replay"][g::2]
        r, p = statistics.median(runner) / 1e3, statistics.median(replay) / 1e3
        out[graph] = {"runner_us": r, "replay_us": p, "bookkeeping_us": r - p}
    return out


def bench_breakdown(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    """Each layer of one hpugraph inference call timed alone, with a real call's arguments."""
    model.eval()
    x = torch.randn(args.batch, args.hidden)
    spy = harness.SpyBackend()
    with torch.no_grad():
        compiled = torch.compile(copy.deepcopy(model), backend=spy)
        compiled(x)
        compiled(x)
        via_api = hpuopt.compile(copy.deepcopy(model))
        via_api(x)
        null = torch.compile(copy.deepcopy(model), backend=harness.null_backend)
        null(x)
        probes = harness.probe_graphs(spy)
    if not probes or not any(g.pieces for g in probes):
        raise RuntimeError("no captured piece was compiled")
    g = probes[0]

    def patch_only() -> None:
        with torch._dynamo.config.patch(DYNAMIC_OP_FLAGS):
            pass

    rows = {
        "eager m(x)": functools.partial(model, x),
        "hpuopt.compile(m)(x)": functools.partial(via_api, x),
        "torch.compile(hpugraph)(x)": functools.partial(compiled, x),
        **harness.level_calls(probes),
        "Dynamo torch-IR graph": functools.partial(g.gm.forward, *g.args),
        "Dynamo + null backend": functools.partial(null, x),
        "config.patch enter+exit": patch_only,
    }
    with torch.no_grad():
        timings = harness.time_rows(rows, warmup=args.warmup, repeats=args.repeats,
                                    number=args.number, first_call=False)
    med = {k: t.cpu_median_s for k, t in timings.items()}
    layers = [
        ("hpuopt.compile wrapper (CompiledModel + its flags)",
         med["hpuopt.compile(m)(x)"] - med["torch.compile(hpugraph)(x)"]),
        ("Dynamo: OptimizedModule, eval frame, guards, param gathering",
         med["torch.compile(hpugraph)(x)"] - med[LEVELS[0]]),
        *harness.stack_layers(med),
        ("ATen graph itself (piece gm.forward)", med[LEVELS[-1]]),
    ]
    return {"timings": timings, "layers_cpu_s": layers, "pieces": harness.describe_pieces(probes, spy.session)}


def bench_address_check(args: argparse.Namespace) -> dict[str, Any]:
    """The per-call check that every parameter is where it was at capture, at 16/64/256
    parameter tensors: hpuopt's check against the Python loop it replaced. On a device the
    whole replay is a few microseconds, so this check must not grow with the model."""
    from hpuopt.runtime.cpu import CpuRuntime
    from hpuopt.runtime.entry import capture, flat_forward
    from hpuopt.runtime.signature import EXACT_KEYS, arg_roles

    rows: dict[str, Any] = {}
    for n in args.address_params:
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]
        x = torch.randn(4)
        gm = _reads_all([x, *params])
        plan = arg_roles(gm, stable=[False] + [True] * n)
        entry = capture(CpuRuntime(), flat_forward(gm, True), plan, (x, *params), EXACT_KEYS,
                        0, [True])
        call_args = (x, *params)
        rows[f"{n} params: python loop"] = functools.partial(
            _python_loop, call_args, plan.stable, entry.ptrs)
        rows[f"{n} params: hpuopt"] = functools.partial(entry.same_addresses, call_args)
    timings = harness.time_rows(rows, warmup=args.warmup, repeats=args.repeats,
                                number=args.number * 10, first_call=False)
    return {"timings": timings}


def _reads_all(inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
    """A graph with one placeholder per input (``meta["val"]`` set, as the runner's plan reads
    it) that adds them all: every input is read."""
    graph = torch.fx.Graph()
    nodes = []
    for i, value in enumerate(inputs):
        node = graph.placeholder(f"a{i}")
        node.meta["val"] = value
        nodes.append(node)
    total = nodes[0]
    for node in nodes[1:]:
        total = graph.call_function(torch.add, (total, node))
    graph.output(total)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _python_loop(args: tuple, stable: tuple[int, ...], ptrs: list[int]) -> bool:
    return [args[i].data_ptr() for i in stable] == ptrs


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, name="overhead", warmup=20, repeats=15, number=100)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="the training-step table (forward + backward)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="time each layer of one hpugraph call alone")
    p.add_argument("--address-params", type=int, nargs="*", default=[16, 64, 256],
                   help="parameter counts of the address-check rows (none: skip them)")
    args = p.parse_args(argv)
    harness.quick(p, args, warmup=5, repeats=3, number=20)

    machine = harness.start(args)
    torch._dynamo.reset()
    hpuopt.reset()
    model = harness.make_mlp(args.blocks, args.hidden)
    print(f"overhead: {args.blocks} x (Linear+GELU+LayerNorm), hidden {args.hidden}, batch "
          f"{args.batch}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{machine['cpu_model']}")
    started = time.perf_counter()
    result = harness.result_header("overhead", args, machine)

    inf = bench_inference(args, model)
    print("\n" + harness.format_table(inf["timings"], "eager", "inference, torch.no_grad()"))
    t, e = inf["timings"], inf["timings"]["eager"]
    goals = [harness.Goal(f"<= {GOAL:.2f}x eager, {row} (wall and cpu)",
                          max(t[row].median_s / e.median_s, t[row].cpu_median_s / e.cpu_median_s),
                          "<=", GOAL, row=row,
                          extra={"wall_ratio": t[row].median_s / e.median_s,
                                 "cpu_ratio": t[row].cpu_median_s / e.cpu_median_s})
             for row in ("hpugraph", "hpuopt.compile")]
    result["goal"] = {"max_ratio_vs_eager": GOAL, "verdicts": harness.report_goals(goals)}
    result["inference"] = harness.rows_json(inf["timings"], "eager")
    result["explain"] = inf["explain"]

    if args.train:
        torch._dynamo.reset()
        tr = bench_training(args, model)
        print("\n" + harness.format_table(tr["timings"], "eager",
                                          "training step, forward + backward"))
        result["training"] = harness.rows_json(tr["timings"], "eager")
        result["training_per_step"] = tr["per_step"]
        print("one hpugraph step (hpuopt.counters): " + ", ".join(
            f"{k} {v:g}" for k, v in tr["per_step"].items()))
        t, a = tr["timings"], tr["timings"]["aot_eager"]
        train_goal = harness.Goal(
            f"<= {GOAL:.2f}x aot_eager, hpugraph training step (cpu)",
            t["hpugraph"].cpu_median_s / a.cpu_median_s, "<=", GOAL, row="hpugraph",
            extra={"wall_ratio": t["hpugraph"].median_s / a.median_s})
        result["goal"]["verdicts"] += harness.report_goals([train_goal])
        torch._dynamo.reset()
        layers = bench_training_layers(args, model)
        result["training_layers_us"] = layers
        print("one hpugraph step, per graph (medians, us): " + "; ".join(
            f"{g}: runner {v['runner_us']:.0f}, replay {v['replay_us']:.0f}, "
            f"bookkeeping {v['bookkeeping_us']:.0f}" for g, v in layers.items()))

    if args.breakdown:
        torch._dynamo.reset()
        bd = bench_breakdown(args, model)
        print("\n" + harness.format_table(
            bd["timings"], "eager m(x)", "breakdown of one hpugraph inference call "
            "(each layer alone)"))
        print("\n" + harness.format_layers(
            bd["layers_cpu_s"], bd["timings"]["eager m(x)"].cpu_median_s,
            title="layer (CPU time per call, medians)", share="% eager",
            sum_label="sum = hpuopt.compile(m)(x)"))
        result["breakdown"] = {"rows": harness.rows_json(bd["timings"], "eager m(x)"),
                               "layers_cpu_s": dict(bd["layers_cpu_s"]),
                               "pieces": bd["pieces"]}
    if args.address_params:
        ad = bench_address_check(args)
        first = f"{args.address_params[0]} params: python loop"
        print("\n" + harness.format_table(ad["timings"], first,
                                          "per-call address check of the stable inputs"))
        result["address_check"] = harness.rows_json(ad["timings"], first)
    harness.finish(result, args, "cpu", started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
