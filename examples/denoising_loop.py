"""A diffusion-style denoising loop: one small UNet called many times per sample, replayed.

Sampling from a diffusion model calls the same denoiser once per step, tens of times per image,
always with the same shapes: the ideal case for device graphs. This example builds a small
UNet-like denoiser — a convolutional down block, a middle block, an up block with a skip
connection from the down path, and a sinusoidal timestep embedding added to the features — and
samples with a simple deterministic (DDIM-like) update, twice: eager, and with the UNet's
forward captured once and replayed on every call (``hpuopt.wrap_in_hpu_graph(unet)``).

The timestep is passed as a tensor, not a Python int: Dynamo specialises on Python numbers, so an
int timestep would mean a new graph (and a new capture) per step value.

    python examples/denoising_loop.py            # 4 samples, 50 steps each
    python examples/denoising_loop.py --short    # CI: 2 samples, 8 steps
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import hpuopt


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (shape ``[B]``) into ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class Block(nn.Module):
    """conv → GroupNorm → SiLU, plus the timestep embedding projected onto the channels."""

    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(4, c_out)
        self.t_proj = nn.Linear(t_dim, c_out)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) + self.t_proj(emb)[:, :, None, None]
        return F.silu(self.norm(h))


class TinyUNet(nn.Module):
    def __init__(self, channels: int = 1, width: int = 16, t_dim: int = 32) -> None:
        super().__init__()
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inp = Block(channels, width, t_dim)
        self.down = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)  # H → H/2
        self.mid = Block(2 * width, 2 * width, t_dim)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)  # H/2 → H
        self.dec = Block(2 * width, width, t_dim)  # after concatenating the skip
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.t_mlp(timestep_embedding(t, self.t_dim))
        skip = self.inp(x, emb)
        h = self.mid(self.down(skip), emb)
        h = self.up(h)
        h = self.dec(torch.cat([h, skip], dim=1), emb)  # the skip connection
        return self.out(h)  # predicted noise


def sample(unet, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic sampling with a cosine schedule: one UNet call per step."""
    alphas = torch.cos(torch.linspace(0, math.pi / 2 * 0.98, steps + 1)) ** 2  # ᾱ from 1 down
    x = noise
    for i in reversed(range(1, steps + 1)):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        eps = unet(x, t)
        a_t, a_prev = alphas[i], alphas[i - 1]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="fast run for CI")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=16, help="image height and width")
    args = p.parse_args(argv)
    samples = args.samples or (2 if args.short else 4)
    steps = args.steps or (8 if args.short else 50)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # batch-1 convolutions: threads' hand-offs cost more than they save

    unet = TinyUNet().eval()
    graphed = hpuopt.wrap_in_hpu_graph(copy.deepcopy(unet))
    with torch.inference_mode():
        # Made inside inference_mode like every later x: Dynamo guards on the difference
        # between inference tensors and ordinary ones, and would compile a second graph.
        noises = [torch.randn(1, 1, args.size, args.size) for _ in range(samples)]
        sample(graphed, noises[0], 2)  # warm-up: compile and capture once
        timings = {}
        results = {}
        for name, model in (("eager", unet), ("graphs", graphed)):
            start = time.perf_counter()
            results[name] = [sample(model, n, steps) for n in noises]
            timings[name] = (time.perf_counter() - start) / (samples * steps)
    for want, got in zip(results["eager"], results["graphs"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    stats = graphed.forward.stats()
    print(f"{samples} sample(s) x {steps} denoising steps of a {args.size}x{args.size} image: "
          f"graph replay equals eager")
    for name, seconds in timings.items():
        print(f"{name:>6}: {seconds * 1e3:.3f} ms per UNet call")
    print(f"graphs held {stats['graphs']}, replays {stats['replays']}, misses {stats['misses']} "
          "(one capture serves every step of every sample)")
    print("(on the CPU a replay re-runs the ops, so it is not faster here; on a device it skips "
          "the host work of every call)")
    assert stats["graphs"] == 1 and stats["misses"] == 1, stats
    assert stats["replays"] == samples * steps + 2, stats
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
