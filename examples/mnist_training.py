"""Training an MNIST classifier through hpuopt, compared with eager.

The model and loop follow the usual small MNIST recipe for device graphs: a two-layer MLP
(784 → 128 → 10) with dropout and ``log_softmax``, ``nll_loss``, and ``Adadelta(lr=0.1)``. The
data is synthetic (random 28×28 images, random labels) so the example needs no download, and the
loader keeps the last, smaller batch (``drop_last=False``): 450 samples in batches of 200 give
200, 200, 50. Under device graphs that last batch is a new input signature; hpuopt captures a
second set of graphs for it (or pads it to a bucket) instead of failing or silently recompiling
each epoch.

Three runs start from the same weights and see the same batches:

* eager PyTorch;
* ``torch.compile(model, backend="hpugraph")``: forward and backward are captured per signature;
* ``hpuopt.ModuleCacher(max_graphs=10)(model=model, inplace=True)``: the opt-in form Gaudi code
  uses, backed by the same backend.

After training, every parameter of both graph runs must equal the eager run's (up to float
rounding). Dropout is switched off for that comparison (``--dropout 0`` is the default): the
random masks drawn inside a captured graph come from the same generator but not in the same
order as eager's, so with dropout on only the loss trend is comparable.

    python examples/mnist_training.py            # 3 epochs over 2000 samples
    python examples/mnist_training.py --short    # CI: 1 epoch over 450 samples
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hpuopt


class Net(nn.Module):
    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout(x)
        return F.log_softmax(self.fc2(x), dim=1)


def synthetic_mnist(samples: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    images = (torch.rand(samples, 1, 28, 28, generator=gen) - 0.1307) / 0.3081
    labels = torch.randint(0, 10, (samples,), generator=gen)
    return TensorDataset(images, labels)


def train(model: nn.Module, call, loader: DataLoader, epochs: int) -> tuple[list[float], float]:
    """The plain training loop; ``call`` is the model as the loop calls it."""
    optimizer = torch.optim.Adadelta(model.parameters(), lr=0.1)
    model.train()
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        for data, target in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.nll_loss(call(data), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="fast run for CI")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--dropout", type=float, default=0.0, help="0 lets parameters be compared")
    args = p.parse_args(argv)
    samples = args.samples or (450 if args.short else 2000)
    epochs = args.epochs or (1 if args.short else 3)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small batches: threads' hand-offs cost more than they save

    loader = DataLoader(synthetic_mnist(samples), batch_size=args.batch_size, drop_last=False)
    sizes = [len(t) for t, _ in loader]
    print(f"data: {samples} synthetic samples, batches of {sizes} (last batch kept), {epochs} epoch(s)")

    reference = Net(args.dropout)
    eager_model = copy.deepcopy(reference)
    eager_losses, eager_s = train(eager_model, eager_model, loader, epochs)

    compiled_model = copy.deepcopy(reference)
    compiled = torch.compile(compiled_model, backend="hpugraph")
    compiled_losses, compiled_s = train(compiled_model, compiled, loader, epochs)

    cached_model = copy.deepcopy(reference)
    hpuopt.ModuleCacher(max_graphs=10)(model=cached_model, inplace=True)
    cached_losses, cached_s = train(cached_model, cached_model, loader, epochs)

    print(f"eager:            first loss {eager_losses[0]:.4f}, last {eager_losses[-1]:.4f}, {eager_s:.2f}s")
    print(f"hpugraph backend: first loss {compiled_losses[0]:.4f}, last {compiled_losses[-1]:.4f}, {compiled_s:.2f}s")
    print(f"ModuleCacher:     first loss {cached_losses[0]:.4f}, last {cached_losses[-1]:.4f}, {cached_s:.2f}s")
    print("(timings include compilation and capture; this is a CPU run, where graphs only emulate a device)")

    if args.dropout == 0.0:
        for name, model in (("hpugraph backend", compiled_model), ("ModuleCacher", cached_model)):
            for (pname, want), got in zip(eager_model.named_parameters(), model.parameters()):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name}: {pname}")
            torch.testing.assert_close(
                torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5
            )
        print("parameters after training: hpugraph backend and ModuleCacher equal eager")
    else:
        print("dropout is on: parameters are not compared (different masks), losses above")

    stats = cached_model.forward.stats()
    print(f"ModuleCacher graphs held: {stats['graphs']}, replays {stats['replays']}, "
          f"hits {stats['hits']}, misses {stats['misses']}")
    assert stats["replays"] > 0
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="Profiler function")
    raise SystemExit(main())
