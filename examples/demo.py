"""hpuopt in one screen: a model with a data-dependent op, compiled with ``hpuopt.compile``.

The model is a tiny token router: an encoder MLP transforms every token, a linear gate scores
it, the tokens with a positive score are kept with a boolean mask (``h[keep]`` — its output
shape depends on the data, so no device graph can hold it), and an expert MLP runs on the kept
tokens only. hpuopt splits the graph at the mask: the encoder and the expert are captured and
replayed, the mask runs as is between them. The expert sees a different number of tokens on
almost every call; the padding analysis proves its rows independent, so the counts share
power-of-two buckets. The encoder piece also takes a mean over the batch, which padding would
change, so it is captured per exact batch size; explain() says so.

On a machine with a CUDA GPU the demo runs there (CUDA Graphs); elsewhere on the CPU runtime,
which emulates device graphs by re-running every op on replay. There is no launch cost for a
CPU graph to save, so on a CPU the timings show hpuopt's own per-call cost, not a speed-up; the
table and the plot say so.

    python examples/demo.py                 # make demo
    python examples/demo.py --quick         # CI: fewer timing iterations (also --short)
    python examples/demo.py --device cpu    # the CPU runtime even where a GPU is present
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import warnings
from pathlib import Path

import torch

import hpuopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def mlp(d_in: int, d_hidden: int, d_out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, d_hidden), torch.nn.GELU(), torch.nn.Linear(d_hidden, d_out)
    )


class TokenRouter(torch.nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.encoder = mlp(dim, hidden, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.gate = torch.nn.Linear(dim, 1)
        self.expert = mlp(dim, hidden, dim)

    def keep(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate(h).squeeze(-1) > 0  # about half of the tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.encoder(x) + x)             # static piece
        routed = h[self.keep(h)]                       # dynamic: as many rows as kept tokens
        y = self.expert(routed)                        # static piece, shape varies per call
        pooled = h.mean(dim=0)                         # a mean over the batch: no padding
        return pooled, y


def what_times_mean(device: str) -> tuple[str, str]:
    """The plot's title and the one-line reading of the numbers, for ``device``."""
    if device == "cpu":
        return (
            "TokenRouter on the CPU runtime: hpuopt's overhead, not a speed-up",
            "on a CPU a replay re-runs every op and there are no kernel launches to save: "
            "the gap above eager is hpuopt's own per-call cost",
        )
    return (
        f"TokenRouter on {device}: per-call time with device graphs",
        f"on {device} a replay launches each captured piece as one graph instead of op by op: "
        "the gap to eager is the launch and Python time saved (or, if above, hpuopt's cost)",
    )


def plot_times(
    rows: list[tuple[int, float, float]], path: Path, device: str = "cpu"
) -> Path | None:
    """Per-call time by batch size, eager against hpuopt, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batches = [r[0] for r in rows]
    title, reading = what_times_mean(device)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(batches, [r[1] for r in rows], "o-", label="eager")
    runtime = "CPU runtime: emulated graphs" if device == "cpu" else "CUDA Graphs"
    ax.plot(batches, [r[2] for r in rows], "s-", label=f"hpuopt ({runtime})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("per-call CPU time (us)" if device == "cpu" else "per-call wall time (us)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.text(0.5, 0.01, textwrap.fill(reading, 90), ha="center", va="bottom", fontsize=8,
             style="italic")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="hpuopt demo: a token router with a boolean mask")
    p.add_argument("--quick", "--short", action="store_true", help="fewer timing iterations (CI)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where the model runs; auto: cuda when available, else cpu",
    )
    p.add_argument(
        "--plot",
        default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo.png"),
        help="where to write the per-call time plot (PNG)",
    )
    args = p.parse_args(argv)
    repeats, number = (3, 10) if args.quick else (7, 50)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    warnings.filterwarnings("ignore", message="hpuopt: .* runs uncaptured")
    harness.set_threads(1)
    torch.manual_seed(0)

    model = TokenRouter().eval().to(device)
    compiled = hpuopt.compile(model)
    batches = [1, 2, 4, 8, 16, 32]
    tol = 1e-5 if device == "cpu" else 1e-4  # padded shapes may pick other GPU kernels

    # 1. Same answer as eager, on fresh random inputs, over a range of batch sizes.
    checks = 0
    with torch.no_grad():
        for batch in batches:
            for _ in range(3):
                x = torch.randn(batch, 64, device=device)
                want, got = model(x), compiled(x)
                for w, g in zip(want, got):
                    torch.testing.assert_close(g, w, rtol=tol, atol=tol)
                    assert g.shape == w.shape
                checks += 1
    print(f"correct: {checks} calls on {device} over batch sizes {batches} match eager")

    # 2. What hpuopt did.
    print()
    print(compiled.explain())

    # 3. Per-call time against eager, same inputs (their graphs are already captured).
    title, reading = what_times_mean(device)
    print()
    print(f"{title}\n({reading})")
    print(f"{'batch':>5}{'kept':>6}{'eager':>10}{'hpuopt':>10}{'hpuopt/eager':>14}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):  # per-call time includes the device's work, not only the launch
        return lambda: (fn(), sync())

    rows = []
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 64, device=device)
            kept = int(model.keep(model.norm(model.encoder(x) + x)).sum())
            t = harness.time_rows(
                {"eager": timed(lambda x=x: model(x)), "hpuopt": timed(lambda x=x: compiled(x))},
                warmup=3, repeats=repeats, number=number,
            )
            if device == "cpu":  # one thread: CPU time is the steadier measure
                e, h = t["eager"].cpu_median_s, t["hpuopt"].cpu_median_s
            else:
                e, h = t["eager"].median_s, t["hpuopt"].median_s
            print(f"{batch:>5}{kept:>6}{e * 1e6:>8.0f}us{h * 1e6:>8.0f}us{h / e:>14.2f}")
            rows.append((batch, e * 1e6, h * 1e6))
    measure = "CPU-time" if device == "cpu" else "wall-time (synchronised)"
    print(f"(per-call {measure} medians, {repeats} repeats of {number} calls, 1 thread"
          + ("; benchmarks/overhead.py shows where hpuopt's per-call cost goes)" if device == "cpu"
             else ")"))
    plot = plot_times(rows, Path(args.plot), device)
    print(f"plot: {plot}" if plot else "plot: skipped (pip install matplotlib to draw it)")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
