"""Training under DistributedDataParallel with ``torch.compile(ddp_model, backend="hpugraph")``.

Two processes on the gloo backend over loopback, started with the ``spawn`` method from the
test. Dynamo's DDP optimizer (``torch._dynamo.config.optimize_ddp``, on by default) splits the
model's graph at DDP bucket boundaries and hands each piece to hpuopt, so a model of several
1 MiB layers with ``bucket_cap_mb=1`` gives several Dynamo graphs, each lowered forward and
backward with its static pieces captured; DDP's gradient all-reduce runs from autograd hooks
between those backward graphs.

Each child trains a compiled DDP model and an eager DDP model from the same initial weights on
the same rank-specific batches, and saves what it saw to a file in a temporary directory; the
parent checks: losses and parameters of compiled and eager agree step by step, gradients are
all-reduced (identical on both ranks) and match eager, the ranks really had different data, the
graph count matches the buckets, captured graphs were replayed, and all-reduces were issued
between backward pieces. The whole run is bounded by a hard timeout that kills the children.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2
TIMEOUT_S = 120.0
"""Hard limit for the whole two-process run; the children are killed after it."""
COLLECTIVE_TIMEOUT_S = 60
"""A collective that waits longer than this (a rank died or diverged) raises in the child."""

WIDTH = 512
LAYERS = 5
"""Each ``Linear(WIDTH, WIDTH)`` holds 1 MiB of float32 weights: one DDP bucket apiece."""
BUCKET_CAP_MB = 1
"""Dynamo's DDP optimizer asserts its first bucket (1 MiB) is not above ``bucket_bytes_cap``,
so 1 MiB is the smallest cap it accepts."""

CASES = {
    # name: (optimizer, batch size of each step)
    "sgd": ("sgd", (16, 16, 16, 16)),
    "adam": ("adam", (16, 16, 16, 16)),
    "last_batch_smaller": ("sgd", (16, 16, 16, 5)),
}


# -- the child process ------------------------------------------------------------------------


class Net(torch.nn.Module):
    """A user-defined module around the layers: with a bare ``nn.Sequential`` as the DDP
    module, Dynamo compiles nothing (its ``forward`` frame, in ``torch.nn``, is skipped once
    ``DDP.forward`` has broken the graph), and every step would run eagerly."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(32, WIDTH), torch.nn.Tanh()]
        for _ in range(LAYERS):
            layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
        layers.append(torch.nn.Linear(WIDTH, 8))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-3)


def _run_case(rank: int, name: str) -> dict:
    import copy

    import torch._dynamo
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hpuopt
    from hpuopt.diagnostics.counters import counters

    opt_kind, batches = CASES[name]
    torch._dynamo.reset()
    hpuopt.reset()

    torch.manual_seed(1234)  # same initial weights on both ranks (DDP broadcasts rank 0's too)
    base = Net()
    eager_ddp = DDP(copy.deepcopy(base), bucket_cap_mb=BUCKET_CAP_MB)
    compiled_ddp = DDP(copy.deepcopy(base), bucket_cap_mb=BUCKET_CAP_MB)

    # Records, for each bucket all-reduce of the compiled model, how many graphs had been
    # captured or replayed by then: all-reduces interleaved with backward pieces see different
    # counts.
    hook_replays: list[list[int]] = []

    def hook(state, bucket):
        hook_replays[-1].append(counters.replays + counters.graphs_captured)
        return default_hooks.allreduce_hook(state, bucket)

    compiled_ddp.register_comm_hook(dist.group.WORLD, hook)
    compiled = torch.compile(compiled_ddp, backend="hpugraph")
    opt_c = _optimizer(opt_kind, compiled_ddp.parameters())
    opt_e = _optimizer(opt_kind, eager_ddp.parameters())

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    # Every step's gradients and parameters are summarised (a digest for the cross-rank check,
    # the largest difference from eager for the other); the last step's are sent in full.
    out: dict = {"losses": {"c": [], "e": []}, "grad_digest": {"c": [], "e": []},
                 "param_digest": {"c": [], "e": []}, "grad_diff": [], "param_diff": []}
    for step, batch in enumerate(batches):
        x = torch.randn(batch, 32, generator=gen)
        y = torch.randn(batch, 8, generator=gen)
        hook_replays.append([])
        grads, params = {}, {}
        for model, opt, tag in ((compiled, opt_c, "c"), (eager_ddp, opt_e, "e")):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            module = compiled_ddp.module if tag == "c" else eager_ddp.module
            grads[tag] = [p.grad.detach().clone() for p in module.parameters()]
            opt.step()
            params[tag] = [p.detach().clone() for p in module.parameters()]
            out["losses"][tag].append(loss.item())
            out["grad_digest"][tag].append([_digest(g) for g in grads[tag]])
            out["param_digest"][tag].append([_digest(p) for p in params[tag]])
        out["grad_diff"].append([_diff(a, b) for a, b in zip(grads["c"], grads["e"])])
        out["param_diff"].append([_diff(a, b) for a, b in zip(params["c"], params["e"])])
    out["last_grads"], out["last_params"] = grads, params

    report = hpuopt.explain()
    out["graphs"] = len(report.graphs)
    out["aot_kinds"] = [sorted(a.kind for a in g.aot_graphs) for g in report.graphs]
    out["counters"] = counters.snapshot().__dict__
    out["hook_replays"] = hook_replays
    out["explain"] = str(report)
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _diff(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """The largest absolute difference, and the largest magnitude of ``expected``."""
    return (actual - expected).abs().max().item(), expected.abs().max().item()


def _collective_in_graph(rank: int) -> dict:
    """A functional all_reduce inside the compiled function, with the ranks missing the graph
    cache on different calls: the collective must still run once per call on every rank."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    import hpuopt

    torch._dynamo.reset()
    hpuopt.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)

    def f(x):
        return fc.all_reduce(lin(x).relu().sum(0), "sum", dist.group.WORLD)

    compiled = torch.compile(f, backend="hpugraph")
    batches = [4, 4, 4] if rank == 0 else [4, 6, 6]  # rank 1 misses alone on call 1
    got, want = [], []
    with torch.no_grad():
        for b in batches:
            x = torch.ones(b, 8) * (rank + 1)
            got.append(compiled(x))
            want.append(f(x))
    reasons = {r.reason for r in hpuopt.explain().splits}
    return {"got": got, "want": want, "reasons": sorted(reasons)}


def _worker(rank: int, port: int, out_dir: str, cases: tuple[str, ...]) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        results = {}
        for name in cases:
            start = time.perf_counter()
            results[name] = _run_case(rank, name)
            results[name]["seconds"] = time.perf_counter() - start
        results["_collective_in_graph"] = _collective_in_graph(rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -- the parent -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _errors(out_dir: Path) -> str:
    return "\n".join(
        f"--- {p.stem} ---\n{p.read_text()}" for p in sorted(out_dir.glob("*.err"))
    )


def _spawn(out_dir: Path, cases: tuple[str, ...]) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, port, str(out_dir), cases), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"DDP workers still running after the {TIMEOUT_S:.0f} s limit; killed them.\n"
                    + _errors(out_dir),
                    pytrace=False,
                )
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(2)  # let the other rank write its error, then stop it
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    codes = [p.exitcode for p in procs]
    if codes != [0] * WORLD_SIZE:
        pytest.fail(f"DDP workers exited with {codes}\n{_errors(out_dir)}", pytrace=False)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    results = _spawn(out_dir, tuple(CASES))
    cases = ", ".join(
        f"{n} {r['seconds']:.1f} s" for n, r in results[0].items() if not n.startswith("_")
    )
    print(f"two-process DDP run: {time.perf_counter() - start:.1f} s (rank 0: {cases})")
    return results


RTOL, ATOL = 1e-5, 1e-6


def _close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_ddp_matches_eager_ddp(ddp_results, case):
    steps = len(CASES[case][1])
    for rank, res in enumerate(ddp_results):
        r = res[case]
        assert len(r["losses"]["c"]) == steps
        for step in range(steps):
            where = f"{case}, rank {rank}, step {step}"
            _close(r["losses"]["c"][step], r["losses"]["e"][step], f"loss ({where})")
            for what in ("grad", "param"):
                for i, (diff, scale) in enumerate(r[f"{what}_diff"][step]):
                    assert diff <= ATOL + RTOL * scale, (
                        f"{what} {i} ({where}): compiled differs from eager by {diff:.3g} "
                        f"(largest magnitude {scale:.3g})"
                    )
        for i, (g, ge) in enumerate(zip(r["last_grads"]["c"], r["last_grads"]["e"])):
            _close(g, ge, f"grad of parameter {i} ({case}, rank {rank}, last step)")
        for i, (p, pe) in enumerate(zip(r["last_params"]["c"], r["last_params"]["e"])):
            _close(p, pe, f"parameter {i} after the last step ({case}, rank {rank})")


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_are_all_reduced(ddp_results, case):
    r0, r1 = (res[case] for res in ddp_results)
    for tag in ("c", "e"):
        # different data on each rank: different local losses...
        for step, (l0, l1) in enumerate(zip(r0["losses"][tag], r1["losses"][tag])):
            assert l0 != l1, f"{case}: both ranks saw the same loss at step {step}"
        # ...but one averaged gradient, so the replicas stay bitwise identical
        for what in ("grad", "param"):
            for step, (d0, d1) in enumerate(
                zip(r0[f"{what}_digest"][tag], r1[f"{what}_digest"][tag])
            ):
                differ = [i for i, (a, b) in enumerate(zip(d0, d1)) if a != b]
                assert not differ, (
                    f"{case} ({tag}): {what}s {differ} differ across ranks at step {step}"
                )
    for g0, g1 in zip(r0["last_grads"]["c"], r1["last_grads"]["c"]):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("case", list(CASES))
def test_graph_is_split_at_buckets_and_captured(ddp_results, case):
    for rank, res in enumerate(ddp_results):
        r = res[case]
        detail = f"{case}, rank {rank}:\n{r['explain']}"
        # one Dynamo graph per bucket. Buckets fill from the output backwards: each 1 MiB
        # layer closes one (the small last layer rides with the last big one), and the small
        # first layer, which has parameters, is a bucket of its own. A smaller last batch
        # recompiles the frame, so every bucket's graph once more.
        per_compile = LAYERS + 1
        compiles = 2 if case == "last_batch_smaller" else 1
        assert r["graphs"] == per_compile * compiles, detail
        assert r["counters"]["dynamo_graphs"] == r["graphs"], detail
        assert all(kinds == ["backward", "forward"] for kinds in r["aot_kinds"]), detail
        assert r["counters"]["graphs_captured"] > 0, detail
        assert r["counters"]["replays"] > 0, detail
        assert r["counters"]["fallbacks"] == 0, detail


@pytest.mark.parametrize("case", list(CASES))
def test_all_reduce_runs_between_backward_pieces(ddp_results, case):
    for rank, res in enumerate(ddp_results):
        r = res[case]
        seen_all = r["hook_replays"]
        detail = f"{case}, rank {rank}: graphs run by each all-reduce, per step: {seen_all}"
        # DDP puts every parameter in one bucket for its first iteration and rebuilds the
        # buckets (1 MiB each, in the order gradients became ready) after it.
        assert [len(s) for s in seen_all] == [1] + [LAYERS + 1] * (len(seen_all) - 1), detail
        for seen in seen_all[1:]:
            # each bucket's all-reduce was issued after one more backward graph had run, not
            # once the whole backward was done
            assert all(a < b for a, b in zip(seen, seen[1:])), detail


def test_collective_inside_a_graph_runs_once_per_call(ddp_results):
    for rank, res in enumerate(ddp_results):
        r = res["_collective_in_graph"]
        assert "collective" in r["reasons"], r["reasons"]
        for call, (g, w) in enumerate(zip(r["got"], r["want"])):
            _close(g, w, f"all_reduce result, rank {rank}, call {call}")
    for a, b in zip(ddp_results[0]["_collective_in_graph"]["got"],
                    ddp_results[1]["_collective_in_graph"]["got"]):
        _close(a, b, "all_reduce result across ranks")
