"""The CPU runtime and the graph cache reproduce device-graph semantics."""

from __future__ import annotations

import pytest
import torch

import hpuopt
from hpuopt.errors import CaptureError
from hpuopt.runtime.cpu import CpuRuntime
from hpuopt.runtime.entry import STALE_READS_RAISE


def test_replay_reads_static_inputs_and_rewrites_same_outputs():
    rt = CpuRuntime()
    x = torch.randn(4)
    static = [x.clone()]
    graph = rt.capture(lambda a: [a * 3], static, warmup_runs=1)
    out = graph.static_outputs[0]
    assert torch.isnan(out).all()  # garbage until the first replay, like a device graph
    graph.replay()
    torch.testing.assert_close(out, static[0] * 3)
    static[0].copy_(torch.randn(4))
    graph.replay()
    assert graph.static_outputs[0] is out  # the same buffer, overwritten
    torch.testing.assert_close(out, static[0] * 3)
    x.fill_(5.0)  # the caller's tensor is not read by replay
    graph.replay()
    torch.testing.assert_close(out, static[0] * 3)


@pytest.mark.parametrize(
    "fn", [lambda a: [a * a.sum().item()], lambda a: [torch.nonzero(a)]], ids=["item", "nonzero"]
)
def test_capture_check_rejects_host_syncs(fn):
    with pytest.raises(CaptureError):
        CpuRuntime(check_capture=True).capture(fn, [torch.randn(4)], warmup_runs=0)
    CpuRuntime(check_capture=False).capture(fn, [torch.randn(4)], warmup_runs=0)


def test_capture_does_not_apply_side_effects_twice():
    """Warm-up and the capture probe run on clones of mutated inputs; the real call mutates once."""

    def f(x):
        x.mul_(2)
        return x + 1

    compiled = torch.compile(f, backend="hpugraph", options={"warmup_runs": 2})
    for _ in range(3):
        x = torch.randn(6)
        ref = x.clone()
        out = compiled(x)
        expected = f(ref)
        torch.testing.assert_close(x, ref)
        torch.testing.assert_close(out, expected)


def test_outputs_returned_earlier_never_change():
    lin = torch.nn.Linear(8, 8)
    compiled = torch.compile(lin, backend="hpugraph")
    with torch.no_grad():
        xs = [torch.randn(2, 8) for _ in range(4)]
        outs = [compiled(x) for x in xs]
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, lin(x))


def test_lru_bound_evicts_and_recaptures():
    lin = torch.nn.Linear(8, 8)
    compiled = torch.compile(
        lin, backend="hpugraph", dynamic=True, options={"max_graphs": 2, "padding": False}
    )
    with torch.no_grad():
        for batch in (2, 3, 4, 2):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), lin(x))
    c = hpuopt.counters
    assert c.evictions >= 2
    (piece,) = [p for p in hpuopt.explain().pieces if p.captured]
    assert len(piece.graphs) == 2 and piece.evictions >= 2


def test_parameter_reallocation_is_detected_and_recaptured():
    lin = torch.nn.Linear(4, 4)
    compiled = torch.compile(lin, backend="hpugraph")
    with torch.no_grad():
        x = torch.randn(3, 4)
        torch.testing.assert_close(compiled(x), lin(x))
        lin.weight.data = torch.randn(4, 4)  # new storage, same Parameter object
        with hpuopt.counters.expect(recaptures=1):
            torch.testing.assert_close(compiled(x), lin(x))
        lin.weight.copy_(torch.randn(4, 4))  # in place: no recapture, new values seen
        with hpuopt.counters.expect(recaptures=0, replays=1):
            torch.testing.assert_close(compiled(x), lin(x))


def test_counters_expect_reports_differences():
    with pytest.raises(AssertionError, match="graphs_captured: expected \\+1, got \\+0"):
        with hpuopt.counters.expect(graphs_captured=1):
            pass
    with pytest.raises(AttributeError, match="nope"):
        with hpuopt.counters.expect(nope=1):
            pass


def test_explain_is_data_and_text(dynamic_op_flags):
    def f(x):
        y = x.cos()
        return y[y > 0.5].exp()

    compiled = hpuopt.compile(f)
    for n in (8, 8, 12):
        x = torch.randn(n)
        torch.testing.assert_close(compiled(x), f(x))
    report = compiled.explain()
    static = [p for p in report.pieces if p.captured]
    dynamic = [p for p in report.pieces if not p.captured]
    assert static and dynamic
    assert all(p.reasons for p in dynamic)
    assert report.counters.replays >= 3
    text = str(report)
    assert "[graph]" in text and "[as is]" in text and "data_dependent_shape" in text
    with pytest.raises(TypeError, match="hpuopt.compile"):
        hpuopt.explain(torch.nn.Linear(2, 2))
    compiled.clear()
    assert all(not p.graphs for p in compiled.explain().pieces)


def test_alias_mode_counts_outputs_overwritten_while_referenced():
    lin = torch.nn.Linear(4, 4)
    compiled = torch.compile(lin, backend="hpugraph", options={"clone_outputs": False})
    with torch.no_grad():
        x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
        out1 = compiled(x1)
        torch.testing.assert_close(out1, lin(x1))
        with pytest.warns(UserWarning, match="still referenced"):
            out2 = compiled(x2)
        assert hpuopt.counters.stale_outputs == 1
        if STALE_READS_RAISE:  # a torch build with CUDA support marks the storage
            with pytest.raises(RuntimeError, match="overwritten by a later call"):
                out1 + 1
        else:
            torch.testing.assert_close(out1, lin(x2))  # documented: the memory was overwritten
        del out1, out2
        compiled(x1)  # nothing handed out earlier is alive: no stale output
        assert hpuopt.counters.stale_outputs == 1


@pytest.mark.cuda
def test_alias_mode_read_of_overwritten_output_raises_on_cuda():
    assert STALE_READS_RAISE
    lin = torch.nn.Linear(4, 4).cuda()
    compiled = torch.compile(lin, backend="hpugraph", options={"clone_outputs": False})
    with torch.no_grad():
        out1 = compiled(torch.randn(2, 4, device="cuda"))
        compiled(torch.randn(2, 4, device="cuda"))
        with pytest.raises(RuntimeError, match="overwritten by a later call"):
            out1 + 1


def test_warmup_captures_declared_shapes_largest_first():
    lin = torch.nn.Linear(8, 8)
    compiled = hpuopt.compile(lin, dynamic=True, padding=False)
    sizes = []
    orig = hpuopt.runtime.cpu.CpuRuntime.capture

    def spy(self, fn, static, *a, **k):
        sizes.append(static[-1].shape[0] if static[-1].dim() else None)
        return orig(self, fn, static, *a, **k)

    hpuopt.runtime.cpu.CpuRuntime.capture = spy
    try:
        n = hpuopt.warmup(compiled, [torch.randn(b, 8) for b in (2, 16, 5)])
    finally:
        hpuopt.runtime.cpu.CpuRuntime.capture = orig
    assert n == 3
    assert [s for s in sizes if s is not None][:3] == sorted(
        [s for s in sizes if s is not None][:3], reverse=True
    )
    with torch.no_grad(), hpuopt.counters.expect(graphs_captured=0):
        x = torch.randn(5, 8)
        torch.testing.assert_close(compiled(x), lin(x))


class _Cache(torch.nn.Module):
    """A write position that advances on every call (a static KV cache's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pos", torch.tensor(0))
        self.register_buffer("cache", torch.zeros(6, 8))

    def forward(self, x):
        idx = torch.arange(x.shape[0]) + self.pos
        self.pos.add_(x.shape[0])
        self.cache.index_copy_(0, idx, x)
        return self.cache.sum(0)


def test_warm_up_does_not_advance_the_state_the_capture_starts_from():
    """Warm-up and capture each start from the inputs' real state: a position advanced by the
    warm-up would index past the cache in the capture though the real call is valid."""
    model, ref = _Cache(), _Cache()
    compiled = torch.compile(model, backend="hpugraph")
    with torch.no_grad():
        for rows in (4, 2):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(compiled(x), ref(x))
    assert hpuopt.counters.fallbacks == 0
    assert torch.equal(model.pos, ref.pos) and torch.equal(model.cache, ref.cache)
