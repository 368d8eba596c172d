"""The CUDA runtime on a GPU. Every test is marked ``cuda`` and skips where there is none."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpuopt
from hpuopt.runtime.cuda import CudaRuntime

cuda = pytest.mark.cuda


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8)).cuda()


@cuda
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


@cuda
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


@cuda
def test_padded_buckets_on_cuda():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True)
    with torch.no_grad():
        for batch in (3, 5, 7, 12, 16, 9):
            x = torch.randn(batch, 32, device="cuda")
            torch.testing.assert_close(compiled(x), model(x))
    piece = next(p for p in hpuopt.explain().pieces if p.captured and p.graphs)
    assert len(piece.graphs) <= 4 and "pads" in piece.padding


@cuda
def test_parameter_reallocation_recaptures_on_cuda():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph")
    with torch.no_grad():
        x = torch.randn(4, 32, device="cuda")
        torch.testing.assert_close(compiled(x), model(x))
        model[0].weight.data = torch.randn_like(model[0].weight)
        with hpuopt.counters.expect(recaptures=1):
            torch.testing.assert_close(compiled(x), model(x))


@cuda
def test_dropout_gives_fresh_masks_per_replay():
    drop = nn.Dropout(0.5).train()
    compiled = torch.compile(lambda x: drop(x), backend="hpugraph")
    x = torch.rand(256, device="cuda") + 0.5
    masks = [(compiled(x) != 0) for _ in range(4)]
    assert all(not torch.equal(masks[0], m) for m in masks[1:])


@cuda
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


@cuda
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


# -- decided on the host: runs without a GPU ------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 3])
def test_capture_device_is_the_inputs_device_not_the_current_one(index):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hpuopt.runtime.cuda import capture_device

    with FakeTensorMode():
        x = torch.empty(4, device=f"cuda:{index}")
        s = torch.empty((), device="cpu")
    assert capture_device([x, s, 3]) == torch.device("cuda", index)


def test_capture_device_refuses_inputs_on_two_devices():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hpuopt.errors import CaptureError
    from hpuopt.runtime.cuda import capture_device

    with FakeTensorMode():
        a, b = torch.empty(4, device="cuda:0"), torch.empty(4, device="cuda:1")
    with pytest.raises(CaptureError, match="several CUDA devices"):
        capture_device([a, b])


# -- capture health, devices, threads, memory (GPU) -------------------------------------------


@cuda
def test_a_failed_capture_leaves_the_process_healthy():
    from hpuopt.errors import CaptureError

    rt = CudaRuntime.shared()
    default = torch.cuda.current_stream()
    bad = [torch.randn(64, device="cuda")]
    with pytest.raises(CaptureError):
        rt.capture(lambda a: [a[a > 0]], bad, warmup_runs=0)  # a boolean mask syncs
    assert torch.cuda.current_stream() == default
    x = torch.randn(32, device="cuda")
    torch.testing.assert_close(x.cos() + 1, torch.cos(x) + 1)  # eager work still runs
    static = [torch.randn(16, device="cuda")]
    graph = rt.capture(lambda a: [a.exp()], static, warmup_runs=1)
    static[0].copy_(torch.randn(16, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph.static_outputs[0], static[0].exp())
    rt.release(graph)


@cuda
def test_a_model_with_linalg_inv_then_another_model_captures():
    a = torch.randn(8, 8, device="cuda") + 8 * torch.eye(8, device="cuda")

    def solve(m, v):
        return torch.linalg.inv(m) @ v

    first = torch.compile(solve, backend="hpugraph")
    v = torch.randn(8, 3, device="cuda")
    torch.testing.assert_close(first(a, v), solve(a, v))
    model = _mlp()
    second = torch.compile(model, backend="hpugraph")
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 32, device="cuda")
            torch.testing.assert_close(second(x), model(x))


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_captures_there():
    torch.cuda.set_device(0)
    model = _mlp().to("cuda:1")
    compiled = torch.compile(model, backend="hpugraph")
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(4, 32, device="cuda:1")
            torch.testing.assert_close(compiled(x), model(x))
    assert torch.cuda.current_device() == 0


@cuda
def test_a_pinned_memory_thread_does_not_break_captures():
    import threading

    stop = threading.Event()
    errors: list[BaseException] = []

    def loader() -> None:
        try:
            while not stop.is_set():
                host = torch.randn(1 << 16).pin_memory()
                host.to("cuda", non_blocking=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=loader, daemon=True)
    thread.start()
    try:
        model = _mlp()
        compiled = torch.compile(model, backend="hpugraph", dynamic=False)
        with torch.no_grad():
            for batch in (1, 2, 3, 4, 5, 6):
                x = torch.randn(batch, 32, device="cuda")
                torch.testing.assert_close(compiled(x), model(x))
    finally:
        stop.set()
        thread.join()
    assert not errors, errors


@cuda
def test_memory_returns_to_baseline_after_clear():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_reserved()
    model = _mlp()
    compiled = hpuopt.compile(model)
    with torch.no_grad():
        for batch in (8, 16, 32, 64):
            compiled(torch.randn(batch, 32, device="cuda"))
    held = sum(p.held_bytes for p in compiled.explain().pieces)
    assert held > 0
    compiled.clear()
    del compiled
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert torch.cuda.memory_reserved() <= baseline + model_bytes + (4 << 20)
