"""The CUDA runtime on a GPU. Every test is marked ``cuda`` and skips where there is none."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpuopt
from hpuopt.runtime.cuda import CudaRuntime

pytestmark = pytest.mark.cuda


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8)).cuda()


def test_capture_then_replay_rewrites_the_same_outputs():
    rt = CudaRuntime.shared()
    static = [torch.randn(16, device="cuda")]
    graph = rt.capture(lambda a: [a.sin() * 2], static, warmup_runs=1)
    assert not graph.executed
    out = graph.static_outputs[0]
    for _ in range(3):
        static[0].copy_(torch.randn(16, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert graph.static_outputs[0] is out
        torch.testing.assert_close(out, static[0].sin() * 2)


def test_model_through_backend_on_cuda_matches_eager():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph")
    kept = []
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(4, 32, device="cuda")
            out = compiled(x)
            torch.testing.assert_close(out, model(x))
            kept.append((x, out))
        for x, out in kept:
            torch.testing.assert_close(out, model(x))
    (aot,) = hpuopt.explain().graphs[0].aot_graphs
    assert aot.runtime == "cuda"
    assert hpuopt.counters.graphs_captured == 1 and hpuopt.counters.replays == 5


def test_padded_buckets_on_cuda():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True)
    with torch.no_grad():
        for batch in (3, 5, 7, 12, 16, 9):
            x = torch.randn(batch, 32, device="cuda")
            torch.testing.assert_close(compiled(x), model(x))
    piece = next(p for p in hpuopt.explain().pieces if p.captured and p.graphs)
    assert len(piece.graphs) <= 4 and "pads" in piece.padding


def test_parameter_reallocation_recaptures_on_cuda():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph")
    with torch.no_grad():
        x = torch.randn(4, 32, device="cuda")
        torch.testing.assert_close(compiled(x), model(x))
        model[0].weight.data = torch.randn_like(model[0].weight)
        with hpuopt.counters.expect(recaptures=1):
            torch.testing.assert_close(compiled(x), model(x))


def test_dropout_gives_fresh_masks_per_replay():
    drop = nn.Dropout(0.5).train()
    compiled = torch.compile(lambda x: drop(x), backend="hpugraph")
    x = torch.rand(256, device="cuda") + 0.5
    masks = [(compiled(x) != 0) for _ in range(4)]
    assert all(not torch.equal(masks[0], m) for m in masks[1:])


def test_training_step_matches_eager_on_cuda():
    model = _mlp()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for _ in range(4):
        x, y = torch.randn(8, 32, device="cuda"), torch.randint(0, 8, (8,), device="cuda")
        for m, o in ((compiled, opt), (ref, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_dynamic_op_between_captured_halves_on_cuda(dynamic_op_flags):
    lin1, lin2 = nn.Linear(16, 16).cuda(), nn.Linear(16, 4).cuda()

    def f(x):
        h = lin1(x)
        return lin2(h[h.norm(dim=-1) > 3.5]).sum(0)

    compiled = torch.compile(f, backend="hpugraph")
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(32, 16, device="cuda")
            torch.testing.assert_close(compiled(x), f(x))
    assert any(not p.captured for p in hpuopt.explain().pieces)
