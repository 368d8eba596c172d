"""hpuopt in one screen: a model with a data-dependent op, compiled with ``hpuopt.compile``.

The model is a tiny token router: an encoder MLP transforms every token, a linear gate scores
it, the tokens with a positive score are kept with a boolean mask (``h[keep]`` — its output
shape depends on the data, so no device graph can hold it), and an expert MLP runs on the kept
tokens only. hpuopt splits the graph at the mask: the encoder and the expert are captured and
replayed, the mask runs as is between them. The expert sees a different number of tokens on
almost every call; the padding analysis proves its rows independent, so the counts share
power-of-two buckets. The encoder piece also takes a mean over the batch, which padding would
change, so it is captured per exact batch size; explain() says so.

    python examples/demo.py           # make demo
    python examples/demo.py --quick   # CI: fewer timing iterations
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import hpuopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402


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


def plot_times(rows: list[tuple[int, float, float]], path: Path) -> Path | None:
    """Per-call time by batch size, eager against hpuopt, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batches = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(batches, [r[1] for r in rows], "o-", label="eager")
    ax.plot(batches, [r[2] for r in rows], "s-", label="hpuopt (CPU runtime)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("per-call CPU time (us)")
    ax.set_title("TokenRouter: time per call")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="hpuopt demo: a token router with a boolean mask")
    p.add_argument("--quick", action="store_true", help="fewer timing iterations (CI)")
    p.add_argument(
        "--plot",
        default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo.png"),
        help="where to write the per-call time plot (PNG)",
    )
    args = p.parse_args(argv)
    repeats, number = (3, 10) if args.quick else (7, 50)
    started = time.perf_counter()
    warnings.filterwarnings("ignore", message="hpuopt: .* runs uncaptured")
    _common.set_threads(1)
    torch.manual_seed(0)

    model = TokenRouter().eval()
    compiled = hpuopt.compile(model)
    batches = [1, 2, 4, 8, 16, 32]

    # 1. Same answer as eager, on fresh random inputs, over a range of batch sizes.
    checks = 0
    with torch.no_grad():
        for batch in batches:
            for _ in range(3):
                x = torch.randn(batch, 64)
                want, got = model(x), compiled(x)
                for w, g in zip(want, got):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
                    assert g.shape == w.shape
                checks += 1
    print(f"correct: {checks} calls over batch sizes {batches} match eager")

    # 2. What hpuopt did.
    print()
    print(compiled.explain())

    # 3. Per-call time against eager, same inputs (their graphs are already captured).
    print()
    print(f"{'batch':>5}{'kept':>6}{'eager':>10}{'hpuopt':>10}{'ratio':>7}")
    rows = []
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 64)
            kept = int(model.keep(model.norm(model.encoder(x) + x)).sum())
            t = _common.time_rows(
                {"eager": lambda: model(x), "hpuopt": lambda: compiled(x)},
                warmup=3, repeats=repeats, number=number,
            )
            e, h = t["eager"].cpu_median_s, t["hpuopt"].cpu_median_s
            print(f"{batch:>5}{kept:>6}{e * 1e6:>8.0f}us{h * 1e6:>8.0f}us{h / e:>7.2f}")
            rows.append((batch, e * 1e6, h * 1e6))
    print(f"(per-call CPU-time medians, {repeats} repeats of {number} calls, 1 thread. On the CPU\n"
          f" runtime a replay re-runs the ops, so this shows hpuopt's own per-call cost, not a\n"
          f" device-graph speed-up; see benchmarks/overhead.py for where that cost goes)")
    plot = plot_times(rows, Path(args.plot))
    print(f"plot: {plot}" if plot else "plot: skipped (pip install matplotlib to draw it)")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
