"""The HPU runtime against a recording stand-in for ``habana_frameworks.torch``.

The stand-in (``hpuopt.testing.habana_standin``) is not Habana's software: it imitates the API's
documented semantics — capture executes and records, replay re-runs into the same buffers — and
raises when the call order is wrong. No Gaudi is needed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import hpuopt
from hpuopt.runtime.hpu import HpuRuntime
from hpuopt.testing import habana_standin


@pytest.fixture
def standin():
    with habana_standin.installed(lazy=True) as s:
        yield s


def test_hpu_runtime_capture_executes_then_replays(standin):
    rt = HpuRuntime.for_config(hpuopt.Config.from_options())
    assert rt.mode == "lazy"
    x = torch.randn(5)
    static = [x.clone()]
    graph = rt.capture(lambda a: [a.sin() * 2], static, warmup_runs=1)
    assert graph.executed
    torch.testing.assert_close(graph.static_outputs[0], static[0].sin() * 2)
    static[0].copy_(torch.randn(5))
    graph.replay()
    torch.testing.assert_close(graph.static_outputs[0], static[0].sin() * 2)
    # the documented order: warm-up flushed with mark_step, synchronise, then capture
    calls = standin.calls
    assert calls[0] == "mark_step"
    assert calls.index("synchronize") < calls.index("capture_begin") < calls.index("capture_end")
    assert calls[-1] == "replay"


def test_standin_enforces_call_order(standin):
    g = standin.HPUGraph()
    with pytest.raises(habana_standin.StandinError, match="capture_end"):
        g.replay()  # graphs.py: replay may be called after capture_end
    g.capture_begin()
    with pytest.raises(habana_standin.StandinError, match="one capture"):
        standin.HPUGraph().capture_begin()
    standin.modules["habana_frameworks.torch.core"].mark_step()  # the bridge lets it be
    g.capture_end()
    g.replay()
    g.reset()
    with pytest.raises(habana_standin.StandinError):
        g.replay()


def test_model_through_backend_on_hpu_runtime(standin):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))
    compiled = torch.compile(model, backend="hpugraph", options={"runtime": "hpu"})
    with torch.no_grad():
        outs = []
        for _ in range(4):
            x = torch.randn(3, 8)
            out = compiled(x)
            torch.testing.assert_close(out, model(x))
            outs.append((x, out))
        for x, out in outs:  # earlier outputs were cloned: a replay did not change them
            torch.testing.assert_close(out, model(x))
    assert standin.calls.count("capture_begin") == 1
    assert standin.calls.count("replay") == 3  # the first call ran inside the capture
    (aot,) = hpuopt.explain().graphs[0].aot_graphs
    assert aot.runtime == "hpu"


def test_in_place_update_of_a_buffer_happens_once_per_call(standin):
    """BatchNorm in training mutates its running stats (stable buffers): with a capture that
    executes, the first call must not apply the update twice."""
    bn = nn.BatchNorm1d(6)
    ref = copy.deepcopy(bn)
    compiled = torch.compile(bn, backend="hpugraph", options={"runtime": "hpu", "warmup_runs": 2})
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 6)
            torch.testing.assert_close(compiled(x), ref(x))
            torch.testing.assert_close(bn.running_mean, ref.running_mean)
            torch.testing.assert_close(bn.running_var, ref.running_var)
            assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)


def _decay(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    state.mul_(0.5).add_(1.5)
    return torch.tanh(x) * 2 + state.sum()


def test_padded_piece_writes_its_in_place_update_once_per_call(standin):
    """A padded piece that also updates a (not padded) copied input: the call whose capture
    executed the work must write that update back, not reload the input over it."""
    compiled = torch.compile(_decay, backend="hpugraph", options={"runtime": "hpu"})
    state = torch.randn(4)
    ref = state.clone()
    for batch in (3, 5, 6, 7, 3):
        x = torch.randn(batch, 4)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x, state), _decay(x, ref))
        torch.testing.assert_close(state, ref)
    (piece,) = [p for p in hpuopt.explain().pieces if p.captured]
    assert piece.padding.startswith("pads") and len(piece.graphs) == 2  # buckets 4 and 8
    assert standin.calls.count("capture_begin") == 2
    assert hpuopt.counters.real_elements == 4 * (3 + 5 + 6 + 7 + 3)  # every call, first ones too


def test_capture_failure_falls_back_with_reason(standin, dynamic_op_flags):
    def f(x):
        return x[x > 0].exp().sum() * x

    compiled = torch.compile(
        f, backend="hpugraph", options={"runtime": "hpu", "disable_passes": ["split"]}
    )
    x = torch.randn(4)
    with pytest.warns(UserWarning, match="runs uncaptured"):
        torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(compiled(x), f(x))
    assert hpuopt.counters.fallbacks == 1
    (piece,) = hpuopt.explain().pieces
    assert any("boolean mask" in r for r in piece.fallbacks), piece.fallbacks


def test_missing_habana_is_a_clear_error():
    with pytest.raises(hpuopt.CaptureError, match="habana_frameworks"):
        HpuRuntime()
