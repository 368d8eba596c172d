"""Faults injected through the runtime: each gives the right answer (the piece runs uncaptured,
the reason recorded and warned once) or, in strict mode, a FallbackError naming the piece and
the reason — and the call after it is right too, with the caller's tensors intact."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn

import hpuopt
from hpuopt.errors import CaptureError
from hpuopt.runtime.cpu import CpuRuntime


def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _check_calls(compiled, model, n=3, batch=4):
    with torch.no_grad():
        for _ in range(n):
            x = torch.randn(batch, 8)
            kept = x.clone()
            torch.testing.assert_close(compiled(x), model(x))
            torch.testing.assert_close(x, kept)  # the input is untouched


@pytest.fixture
def inject(monkeypatch):
    """Replaces CpuRuntime.capture with ``fault(original, *args)`` for the test."""

    def install(fault):
        original = CpuRuntime.capture

        def capture(self, *args, **kwargs):
            return fault(lambda: original(self, *args, **kwargs))

        monkeypatch.setattr(CpuRuntime, "capture", capture)

    return install


@pytest.mark.parametrize(
    "error, fragment",
    [
        (CaptureError("injected: op rejected under capture"), "op rejected under capture"),
        (torch.OutOfMemoryError("injected: no memory"), "out of memory"),
    ],
    ids=["capture-error", "out-of-memory"],
)
def test_capture_failure_falls_back_and_warns_once(inject, error, fragment):
    def fault(run):
        raise error

    inject(fault)
    model = _model()
    compiled = torch.compile(model, backend="hpugraph")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_calls(compiled, model, n=4)
    ours = [w for w in caught if "runs uncaptured" in str(w.message)]
    assert len(ours) == 1 and fragment in str(ours[0].message)
    assert hpuopt.counters.fallbacks == 1 and hpuopt.counters.uncaptured_runs == 4
    (piece,) = hpuopt.explain().pieces
    assert any(fragment in r for r in piece.fallbacks)
    assert "runs uncaptured for some inputs" in str(hpuopt.explain())


def test_strict_turns_capture_failure_into_named_error(inject):
    def fault(run):
        raise CaptureError("injected failure")

    inject(fault)
    model = _model()
    compiled = torch.compile(model, backend="hpugraph", options={"strict": True})
    with torch.no_grad(), pytest.raises(Exception) as err:
        compiled(torch.randn(2, 8))
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    fallback = next(e for e in chain if isinstance(e, hpuopt.FallbackError))
    assert "submod_0" in str(fallback) and "injected failure" in str(fallback)


def test_replay_that_raises_is_answered_uncaptured_then_stays_right(inject):
    state = {"fail": 1}

    def fault(run):
        graph = run()
        replay = graph.replay

        def flaky():
            if state["fail"]:
                state["fail"] -= 1
                raise RuntimeError("injected replay fault")
            replay()

        graph.replay = flaky
        return graph

    inject(fault)
    model = _model()
    compiled = torch.compile(model, backend="hpugraph")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_calls(compiled, model, n=4)
    (piece,) = hpuopt.explain().pieces
    assert any("injected replay fault" in r for r in piece.fallbacks)


def test_strict_replay_fault_raises(inject):
    def fault(run):
        graph = run()

        def broken():
            raise RuntimeError("injected replay fault")

        graph.replay = broken
        return graph

    inject(fault)
    compiled = torch.compile(_model(), backend="hpugraph", options={"strict": True})
    with torch.no_grad(), pytest.raises(hpuopt.FallbackError, match="replay failed"):
        compiled(torch.randn(2, 8))


def test_module_attribute_change_between_calls():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = 2.0

        def forward(self, x):
            return self.lin(x) * self.scale

    model = Scaled()
    compiled = torch.compile(model, backend="hpugraph")
    with torch.no_grad():
        for scale in (2.0, 3.0, 2.0):
            model.scale = scale
            x = torch.randn(3, 4)
            torch.testing.assert_close(compiled(x), model(x))


def test_byte_budget_bounds_what_a_piece_holds():
    model = _model()
    budget = 1_000  # a 30-row graph alone holds ~1.4 kB of static buffers
    compiled = torch.compile(
        model,
        backend="hpugraph",
        dynamic=True,
        options={"max_graph_bytes": budget, "padding": False},
    )
    with torch.no_grad():
        for batch in (4, 9, 17, 30, 4):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
    (piece,) = [p for p in hpuopt.explain().pieces if p.captured]
    assert piece.evictions >= 2
    assert piece.held_bytes <= budget or len(piece.graphs) == 1


def test_two_threads_on_one_compiled_model():
    model = _model()
    compiled = torch.compile(model, backend="hpugraph")
    with torch.no_grad():
        compiled(torch.randn(4, 8))  # compile once up front
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            with torch.no_grad():
                for _ in range(60):
                    x = torch.randn(4, 8, generator=gen)
                    torch.testing.assert_close(compiled(x), model(x))
        except BaseException as exc:  # collected and re-raised by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors[0]
