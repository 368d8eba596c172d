"""``runtime="direct"``: static pieces compiled per key and called on the caller's tensors.

Compared with eager on fresh random inputs: results, in-place updates of the caller's tensors,
outputs that must not change under the caller, buckets that bound the compilations, training.
Most tests use a recording compiler (no C++ compile); one goes through Inductor for real.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hpuopt
from hpuopt import ConfigError
from hpuopt.diagnostics.explain import default_session
from hpuopt.runtime.direct import DirectRunner


def _runners():
    return [p.runner for g in default_session.graphs for a in g.aot_graphs for p in a.pieces
            if p.runner is not None]


class Recording:
    """Records the example inputs of each compile; returns the graph's own forward."""

    def __init__(self) -> None:
        self.shapes: list[tuple] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.shapes.append(tuple(tuple(t.shape) for t in example_inputs
                                 if isinstance(t, torch.Tensor)))
        return gm.forward


class Masked(nn.Module):
    """An MLP, the rows above a norm threshold (a data-dependent count), an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.second = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.second(h[h.norm(dim=-1) > h.norm(dim=-1).median()])


def test_masked_model_matches_eager_with_nothing_copied():
    model = Masked().eval()
    rec = Recording()
    compiled = torch.compile(model, backend="hpugraph",
                             options={"runtime": "direct", "piece_compiler": rec})
    with torch.no_grad():
        for _ in range(6):
            x = torch.randn(12, 8)
            torch.testing.assert_close(compiled(x), model(x))
    runners = _runners()
    assert runners and all(isinstance(r, DirectRunner) for r in runners)
    c = hpuopt.counters
    assert (c.static_copies, c.output_clones, c.outputs_lent, c.graphs_captured) == (0, 0, 0, 0)
    assert c.replays == sum(r.replays for r in runners) > 0
    text = str(hpuopt.explain())
    assert "[compiled]" in text and "nothing copied or cloned" in text
    assert "compiled keys in" in text or "compiled key in" in text
    assert "direct runtime" in text


def test_outputs_are_fresh_per_call():
    """An output the caller keeps does not change on a later call (no buffer is reused)."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh()).eval()
    compiled = torch.compile(model, backend="hpugraph",
                             options={"runtime": "direct", "piece_compiler": Recording()})
    with torch.no_grad():
        xs = [torch.randn(3, 6) for _ in range(3)]
        outs = [compiled(x) for x in xs]
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, model(x))


def test_buckets_bound_the_compilations():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    rec = Recording()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True,
                             options={"runtime": "direct", "piece_compiler": rec})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in (3, 5, 7, 2, 6, 8, 4, 3):  # no 1: Dynamo specialises it
            x = torch.randn(batch, 8, generator=gen)
            out = compiled(x)
            assert out.shape == (batch, 4)
            torch.testing.assert_close(out, model(x))
    (runner,) = _runners()
    batches = sorted({s[0] for shapes in rec.shapes for s in shapes if len(s) == 2 and s[1] == 8
                      and s[0] != 16})
    assert set(batches) <= {2, 4, 8}  # each compile saw a bucket, never an odd size
    assert runner.compiles == len(rec.shapes) <= 3
    assert hpuopt.counters.padded_elements > 0
    assert "pads" in str(hpuopt.explain())


def test_in_place_updates_reach_the_caller_once():
    """BatchNorm in training updates its running stats: once per call, as in eager."""
    bn = nn.BatchNorm1d(5).train()
    ref = copy.deepcopy(bn)
    compiled = torch.compile(bn, backend="hpugraph",
                             options={"runtime": "direct", "piece_compiler": Recording()})
    for _ in range(3):
        x = torch.randn(7, 5)
        torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_training_gradients_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph",
                             options={"runtime": "direct", "piece_compiler": Recording()})
    for _ in range(3):
        x = torch.randn(4, 8)
        compiled(x).sum().backward()
        ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_capture_off_runs_pieces_as_they_are():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    rec = Recording()
    compiled = torch.compile(model, backend="hpugraph",
                             options={"runtime": "direct", "piece_compiler": rec,
                                      "capture": False})
    with torch.no_grad():
        x = torch.randn(2, 4)
        torch.testing.assert_close(compiled(x), model(x))
    assert not rec.shapes and hpuopt.counters.uncaptured_runs > 0


def test_unknown_runtime_names_direct_among_the_choices():
    with pytest.raises(ConfigError, match="direct"):
        hpuopt.Config(runtime="nope")  # type: ignore[arg-type]


def test_inductor_pieces_match_eager():
    """The default compiler of the direct runtime is Inductor."""
    model = Masked().eval()
    compiled = torch.compile(model, backend="hpugraph", options={"runtime": "direct"})
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(10, 8)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    runners = _runners()
    assert {r.compiler for r in runners} == {"inductor"}
    assert sum(r.compiles for r in runners) >= 2


class FailsOnSecondCall:
    """A compiler whose callables raise from their second call on."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        calls = []

        def run(*args):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("compiled code refused these inputs")
            return gm.forward(*args)
        return run


@pytest.mark.parametrize("strict", [False, True])
def test_a_call_that_raises_runs_the_aten_ops_or_raises_under_strict(strict):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="hpugraph",
                             options={"runtime": "direct", "strict": strict,
                                      "piece_compiler": FailsOnSecondCall()})
    with torch.no_grad():
        x = torch.randn(3, 4)
        torch.testing.assert_close(compiled(x), model(x))
        y = torch.randn(3, 4)
        if strict:
            with pytest.raises(hpuopt.FallbackError, match="refused these inputs"):
                compiled(y)
            return
        with pytest.warns(UserWarning, match="refused these inputs"):
            torch.testing.assert_close(compiled(y), model(y))
        torch.testing.assert_close(compiled(x), model(x))
    (runner,) = _runners()
    assert any("refused these inputs" in r for r in runner.fallback_reasons.values())


@pytest.mark.cuda
def test_cuda_pieces_called_directly_match_eager():
    """On a GPU: Inductor pieces called directly, around a boolean mask, with a padded batch."""
    model = Masked().cuda().eval()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True,
                             options={"runtime": "direct"})
    with torch.no_grad():
        for batch in (10, 12, 9, 16):
            x = torch.randn(batch, 8, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-3)
    assert hpuopt.counters.graphs_captured == hpuopt.counters.static_copies == 0
