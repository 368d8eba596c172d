"""The HPU runtime in each of the Gaudi bridge's execution modes, against the Habana stand-in.

Compile mode (``PT_HPU_LAZY_MODE=0``): static pieces go through ``hpu_backend`` per key, with
fixed (bucketed or exact) shapes; dynamic pieces run as they are; no HPU Graph, no
``mark_step``. Lazy mode (``PT_HPU_LAZY_MODE=1``): HPU Graphs captured the way the bridge's
``wrap_in_hpu_graph`` captures them, with ``dry_run`` and ``disable_tensor_cache`` understood.
Any other mode is a clear error. Results are compared with eager on fresh random inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import hpuopt
from hpuopt import Config
from hpuopt.diagnostics.explain import default_session
from hpuopt.runtime.hpu import HpuRuntime
from hpuopt.testing import habana_standin


class MaskedMLP(nn.Module):
    """An MLP, a boolean-mask row selection, an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 16), nn.GELU())
        self.b = nn.Sequential(nn.Linear(16, 4), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h[h.norm(dim=-1) > 2.0])


def _pieces():
    return [p for g in default_session.graphs for a in g.aot_graphs for p in a.pieces]


# -- the mode and the runtime's choice --------------------------------------------------------


@pytest.mark.parametrize("raw, mode", [(None, "auto"), ("0", "compile"), ("1", "lazy"),
                                       ("2", "PT_HPU_LAZY_MODE=2")])
def test_config_reads_the_bridge_mode(raw, mode):
    environ = {} if raw is None else {"PT_HPU_LAZY_MODE": raw}
    cfg = Config.from_options(environ=environ)
    assert cfg.hpu_mode == mode
    assert cfg.hpu_execution_mode == ("compile" if mode == "auto" else mode)


def test_bridge_variable_overrides_disable_tensor_cache():
    """graphs.py, wrapped_hpugraph_forward: PT_HPUGRAPH_DISABLE_TENSOR_CACHE wins when set."""
    on = {"PT_HPUGRAPH_DISABLE_TENSOR_CACHE": "1"}
    assert Config.from_options(environ=on).hpu_disable_tensor_cache
    off = {"PT_HPUGRAPH_DISABLE_TENSOR_CACHE": "0"}
    assert not Config.from_options({"hpu_disable_tensor_cache": True}, environ=off)\
        .hpu_disable_tensor_cache


@pytest.mark.parametrize("lazy, mode, compiler", [(False, "compile", "hpu_backend"),
                                                  (True, "lazy", "eager")])
def test_runtime_follows_the_mode(lazy, mode, compiler):
    with habana_standin.installed(lazy=lazy):
        rt = HpuRuntime.for_config(Config.from_options())
        assert (rt.mode, rt.default_piece_compiler) == (mode, compiler)
        compiled = torch.compile(nn.Linear(4, 4), backend="hpugraph", options={"runtime": "hpu"})
        with torch.no_grad():
            compiled(torch.randn(2, 4))
    (piece,) = [p for p in _pieces() if p.runner is not None]
    assert piece.runner.compiler == compiler


def test_an_unknown_mode_is_a_clear_error(monkeypatch):
    with habana_standin.installed(lazy=False):
        monkeypatch.setenv("PT_HPU_LAZY_MODE", "2")
        compiled = torch.compile(nn.Linear(4, 4), backend="hpugraph", options={"runtime": "hpu"})
        with pytest.raises(Exception, match="PT_HPU_LAZY_MODE=2") as err:
            compiled(torch.randn(2, 4))
    message = str(err.value)
    assert "PT_HPU_LAZY_MODE=0" in message and "PT_HPU_LAZY_MODE=1" in message


def test_hpu_backend_is_not_there_in_lazy_mode():
    with habana_standin.installed(lazy=True):
        compiled = torch.compile(nn.Linear(4, 4), backend="hpugraph",
                                 options={"runtime": "hpu", "piece_compiler": "hpu_backend"})
        with pytest.raises(Exception, match="compile mode only"):
            compiled(torch.randn(2, 4))


# -- compile mode -------------------------------------------------------------------------------


def test_compile_mode_hands_hpu_backend_static_bucketed_pieces(dynamic_op_flags):
    model = MaskedMLP().eval()
    with habana_standin.installed(lazy=False) as standin, torch.no_grad():
        compiled = torch.compile(model, backend="hpugraph", dynamic=True,
                                 options={"runtime": "hpu"})
        for batch in (3, 5, 6, 7, 12, 3, 6):
            x = torch.randn(batch, 8) * 2
            torch.testing.assert_close(compiled(x), model(x))
    assert standin.calls.count("mark_step") == 0
    assert standin.calls.count("capture_begin") == 0
    assert standin.compiles and hpuopt.counters.compile_fallbacks == 0
    # the stand-in checked every graph: no data-dependent op, concrete shapes; the leading
    # piece's batch dimension is a bucket, so a new batch size is not a new compilation
    first = [c.shapes for c in standin.compiles if c.shapes[-1] and c.shapes[-1][-1] == 8]
    assert {s[-1][0] for s in first} <= {4, 8, 16}
    assert hpuopt.counters.piece_compiles == len(standin.compiles) <= 6
    assert hpuopt.counters.pieces_dynamic == 1


def test_compile_mode_training_updates_buffers_once():
    """BatchNorm in training mutates its running stats: compiled pieces keep the mutation."""
    bn = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    ref = copy.deepcopy(bn)
    with habana_standin.installed(lazy=False) as standin:
        compiled = torch.compile(bn, backend="hpugraph", options={"runtime": "hpu"})
        for _ in range(3):
            x = torch.randn(4, 6)
            out, ref_out = compiled(x), ref(x)
            torch.testing.assert_close(out, ref_out)
            out.square().sum().backward()
            ref_out.square().sum().backward()
            torch.testing.assert_close(bn[1].running_mean, ref[1].running_mean)
            torch.testing.assert_close(bn[1].running_var, ref[1].running_var)
    for p, q in zip(bn.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert standin.compiles and "capture_begin" not in standin.calls


# -- lazy mode ------------------------------------------------------------------------------------


def test_lazy_mode_captures_on_the_default_stream_with_mark_steps(dynamic_op_flags):
    model = MaskedMLP().eval()
    with habana_standin.installed(lazy=True) as standin, torch.no_grad():
        compiled = torch.compile(model, backend="hpugraph", options={"runtime": "hpu"})
        for _ in range(3):
            x = torch.randn(6, 8) * 2
            torch.testing.assert_close(compiled(x), model(x))
    assert standin.captures and {c["stream"] for c in standin.captures} == {"default"}
    assert standin.calls.count("mark_step") >= 6  # around the dynamic piece, every call
    assert "hpu_backend" not in standin.calls


@pytest.mark.parametrize("options", [{"hpu_dry_run": True}, {"hpu_disable_tensor_cache": True}],
                         ids=["dry_run", "disable_tensor_cache"])
def test_lazy_mode_bridge_graph_options(options):
    """A buffer updated in place (BatchNorm's running stats) once per call, under dry_run (the
    capture launches nothing; one replay follows it) and disable_tensor_cache (inputs marked,
    replays through replayV3)."""
    bn = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    ref = copy.deepcopy(bn)
    with habana_standin.installed(lazy=True) as standin, torch.no_grad():
        compiled = torch.compile(bn, backend="hpugraph",
                                 options={"runtime": "hpu", "warmup_runs": 0, **options})
        for _ in range(3):
            x = torch.randn(4, 6)
            torch.testing.assert_close(compiled(x), ref(x))
            torch.testing.assert_close(bn[1].running_mean, ref[1].running_mean)
            assert int(bn[1].num_batches_tracked) == int(ref[1].num_batches_tracked)
    assert standin.captures and all(c["dry_run"] for c in standin.captures)
    if "hpu_disable_tensor_cache" in options:
        assert "mark_user_inputs" in standin.calls and "mark_user_outputs" in standin.calls
        assert standin.calls.count("replayV3") >= 3  # the dry run's replay, then two calls
        assert "replay" not in standin.calls


def test_standin_dry_run_launches_nothing():
    with habana_standin.installed(lazy=True) as standin:
        hpu = standin.modules["habana_frameworks.torch.hpu"]
        state = torch.randn(3)
        before = state.clone()
        g = hpu.HPUGraph()
        with hpu.graph(g, dry_run=True):
            out = state.add_(1).exp()
        torch.testing.assert_close(state, before)  # the write was undone
        assert out.isnan().all()  # its output holds garbage
        g.replay()
        torch.testing.assert_close(state, before + 1)
        torch.testing.assert_close(out, (before + 1).exp())


def test_standin_refuses_hpu_graphs_in_compile_mode():
    with habana_standin.installed(lazy=False) as standin:
        with pytest.raises(habana_standin.StandinError, match="Lazy mode"):
            standin.HPUGraph().capture_begin()


# -- max_graphs as the bridge means it --------------------------------------------------------


@pytest.mark.parametrize("runtime", ["cpu", "hpu"])
def test_past_max_graphs_uncaptured(runtime):
    """graphs.py, wrapped_hpugraph_forward: once max_graphs graphs are cached, a new shape runs
    the original forward; the graphs already held stay."""
    lin = nn.Linear(4, 4)
    with habana_standin.installed(lazy=True) as standin, torch.no_grad():
        compiled = torch.compile(lin, backend="hpugraph", dynamic=True, options={
            "runtime": runtime, "max_graphs": 2, "past_max_graphs": "uncaptured",
            "padding": False})
        for batch in (2, 3, 4, 2, 5, 3, 4):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(compiled(x), lin(x))
    (runner,) = [p.runner for p in _pieces() if p.runner is not None]
    assert len(runner.entries) == 2 and hpuopt.counters.evictions == 0
    assert hpuopt.counters.uncaptured_runs == 3  # batches 4, 5, 4
    assert any("past max_graphs=2" in r for r in runner.fallback_reasons.values())
    if runtime == "hpu":
        assert standin.calls.count("capture_begin") == hpuopt.counters.graphs_captured
