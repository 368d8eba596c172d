"""Dynamic control flow and a dynamic op, trained through device graphs.

Two small models from the usual "dynamicity in models" examples for device graphs:

* **dynamic control flow**: ``module1`` feeds ``module2`` *or* ``module3``, chosen at random each
  step (``Linear(784, 128)`` → ``Linear(128, 100)`` or ``Linear(128, 50)``);
* **dynamic op**: ``module1`` → ``t[torch.where(t > 0)]`` → ``module2`` (``Linear(10, 3)``, then
  boolean indexing whose output length depends on the data, then ``ReLU``).

Each is trained with ``Adadelta(lr=0.1)`` on ``|mean(output) − target|`` three ways from the same
weights, on the same data and the same sequence of paths: eager, the whole forward through
``hpuopt.compile``, and only the submodules opted in with ``hpuopt.ModuleCacher`` (the forward's
Python — the branch, the indexing — runs as usual between them). Parameters after training must
equal eager's. With ``hpuopt.compile``, Dynamo specialises on the Python value that picks the
branch, so each path is its own graph; the boolean indexing stays inside the graph and hpuopt
splits it out, capturing ``module1`` and ``module2`` around it. ``explain()`` shows both.

    python examples/dynamic_model.py            # 200 steps per model, as in the original loops
    python examples/dynamic_model.py --short    # CI: 12 steps
"""

from __future__ import annotations

import argparse
import copy
import random
import warnings

import torch
import torch.nn as nn

import hpuopt


class ControlFlowNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module1 = nn.Linear(784, 128)
        self.module2 = nn.Linear(128, 100)
        self.module3 = nn.Linear(128, 50)

    def forward(self, x: torch.Tensor, path: int) -> torch.Tensor:
        tmp = self.module1(x)
        # The branch is Python: a device graph cannot hold it, so each path gets its own graphs.
        return self.module2(tmp) if path == 1 else self.module3(tmp)


class DynamicOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module1 = nn.Linear(10, 3)
        self.module2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tmp = self.module1(x)
        tmp = tmp[torch.where(tmp > 0)]  # dynamic op: as many elements as are positive
        return self.module2(tmp)


def train(model: nn.Module, call, batches, paths) -> list[float]:
    optimizer = torch.optim.Adadelta(model.parameters(), lr=0.1)
    losses = []
    for (data, target), path in zip(batches, paths):
        optimizer.zero_grad(set_to_none=True)
        out = call(data) if path is None else call(data, path)
        loss = torch.abs(out.mean() - target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def compare(name: str, model: nn.Module, reference: nn.Module) -> None:
    for (pname, want), got in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{name}: {pname}")


def train_three_ways(label: str, base: nn.Module, batches, paths, opt_in: list[str]):
    """Trains copies of ``base`` eagerly, through ``hpuopt.compile`` and with the submodules
    named in ``opt_in`` wrapped by ``ModuleCacher``; checks both against eager."""
    eager = copy.deepcopy(base)
    train(eager, eager, batches, paths)

    whole = copy.deepcopy(base)
    compiled = hpuopt.compile(whole)
    train(whole, compiled, batches, paths)
    compare(f"{label}, hpuopt.compile", whole, eager)

    opted = copy.deepcopy(base)
    for name in opt_in:
        hpuopt.ModuleCacher(max_graphs=10)(model=opted.get_submodule(name), inplace=True)
    train(opted, opted, batches, paths)
    compare(f"{label}, ModuleCacher", opted, eager)
    return eager, compiled, opted


def run_control_flow(steps: int) -> hpuopt.CompiledModel:
    rng = random.Random(0)
    paths = [1 if rng.random() > 0.5 else 2 for _ in range(steps)]
    inputs = [torch.rand(5, 784) for _ in range(steps)]
    batches = [(x, x.mean()) for x in inputs]
    _, compiled, opted = train_three_ways(
        "control flow", ControlFlowNet(), batches, paths, ["module1", "module2", "module3"]
    )

    graphs = {n: m.forward.stats()["graphs"] for n, m in opted.named_children()}
    print(f"control flow: {steps} steps, path 1 taken {paths.count(1)}x, path 2 {paths.count(2)}x; "
          f"hpuopt.compile and ModuleCacher equal eager (graphs per opted-in module: {graphs})")
    return compiled


def run_dynamic_op(steps: int) -> hpuopt.CompiledModel:
    inputs = [torch.randn(5, 10) for _ in range(steps)]
    batches = [(x, x.mean()) for x in inputs]
    paths = [None] * steps
    eager, compiled, opted = train_three_ways(
        "dynamic op", DynamicOpNet(), batches, paths, ["module1", "module2"]
    )

    kept = [int((eager.module1(x) > 0).sum()) for x, _ in batches]
    relu = opted.module2.forward.stats()
    print(f"dynamic op: {steps} steps, kept {min(kept)}..{max(kept)} of 15 elements per step; "
          f"hpuopt.compile and ModuleCacher equal eager (ReLU module: {relu['graphs']} graph(s), "
          f"{relu['replays']} replays)")
    return compiled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="fast run for CI")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    steps = args.steps or (12 if args.short else 200)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny ops: threads' hand-offs cost more than they save
    # bucket padding may leave a size above the largest bucket uncaptured; not an error here
    warnings.filterwarnings("ignore", message="hpuopt: .* runs uncaptured")

    control = run_control_flow(steps)
    dynamic = run_dynamic_op(steps)
    print("\n--- explain(), control flow through hpuopt.compile ---")
    print(control.explain())
    print("\n--- explain(), dynamic op through hpuopt.compile ---")
    print(dynamic.explain())
    report = dynamic.explain()
    assert any(r.reason == "data_dependent_shape" for r in report.splits), report
    assert any(p.captured and p.replays for p in report.pieces), report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
