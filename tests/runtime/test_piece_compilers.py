"""Piece compilers: each static piece compiled per key (or once with symbolic shapes) before
the runtime captures it; compared with eager on fresh random inputs.

Most tests use a recording compiler (a callable, or a stand-in for Inductor that records what
it is handed and runs the graph as is) so they cost no C++ compile; one small model goes
through Inductor for real, and the heavier Inductor cases are marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import hpuopt
from hpuopt import ConfigError
from hpuopt.diagnostics.explain import default_session
from hpuopt.runtime import compilers


def _runners():
    return [p.runner for g in default_session.graphs for a in g.aot_graphs for p in a.pieces
            if p.runner is not None]


class Recording:
    """A piece compiler that records the graphs and example inputs it is handed and returns
    the graph's own forward (what it compiles is exactly what runs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.fx.GraphModule, list]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.calls.append((gm, list(example_inputs)))
        return gm.forward


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).eval()


def test_callable_compiler_gets_each_bucket_once():
    model = _mlp()
    rec = Recording()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True,
                             options={"piece_compiler": rec})
    with torch.no_grad():
        for batch in (3, 4, 5, 7, 3, 8, 6):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
    (runner,) = _runners()
    assert runner.compiler == "callable Recording"
    # buckets 4 and 8: one compile each, on bucket-shaped example inputs (real tensors)
    batches = sorted(ex[i].shape[0] for _, ex in rec.calls
                     for i, t in enumerate(ex) if isinstance(t, torch.Tensor) and t.dim() == 2
                     and t.shape[1] == 8 and t.shape[0] != 16)  # x, not the weight
    assert batches == [4, 8]
    assert runner.compiles == hpuopt.counters.piece_compiles == 2
    for gm, _ in rec.calls:  # the compiler is handed a graph returning a tuple, like Dynamo's
        out = next(n for n in gm.graph.nodes if n.op == "output")
        assert isinstance(out.args[0], tuple)


def test_a_recapture_does_not_compile_again():
    """Promotion of an input that never moves recaptures the piece: the compiled callable of
    its key is reused."""
    state = torch.randn(4)
    rec = Recording()

    def f(x, s):
        return (x * s).tanh() + s

    compiled = torch.compile(f, backend="hpugraph", options={"piece_compiler": rec})
    for _ in range(6):
        x = torch.randn(3, 4)
        torch.testing.assert_close(compiled(x, state), f(x, state))
    assert hpuopt.counters.promotions == 1 and hpuopt.counters.graphs_captured == 2
    assert len(rec.calls) == 1


def test_a_failed_compile_runs_the_aten_ops_with_the_reason():
    def broken(gm, example_inputs):
        raise RuntimeError("cannot lower this")

    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph", options={"piece_compiler": broken})
    with torch.no_grad(), pytest.warns(UserWarning, match="runs its ATen ops uncompiled"):
        x = torch.randn(2, 8)
        torch.testing.assert_close(compiled(x), model(x))
    with torch.no_grad():
        x = torch.randn(2, 8)
        torch.testing.assert_close(compiled(x), model(x))
    (runner,) = _runners()
    (reason,) = runner.compile_fallbacks.values()
    assert "cannot lower this" in reason and hpuopt.counters.compile_fallbacks == 1
    assert hpuopt.counters.replays >= 1  # still captured


def test_hpu_backend_needs_the_bridge():
    compiled = torch.compile(nn.Linear(2, 2), backend="hpugraph",
                             options={"piece_compiler": "hpu_backend"})
    with pytest.raises(Exception, match="hpu_backend") as err:
        compiled(torch.randn(1, 2))
    assert isinstance(err.value, ConfigError) or "ConfigError" in str(err.value)


def test_auto_is_eager_on_the_cpu_runtime():
    compiled = torch.compile(nn.Linear(2, 2), backend="hpugraph")
    compiled(torch.randn(1, 2))
    (runner,) = _runners()
    assert runner.compiler == "eager" and runner.compiles == 0


# -- symbolic shapes ------------------------------------------------------------------------------


@pytest.fixture
def symbolic_recorder(monkeypatch):
    """Inductor replaced by a recording compiler that accepts symbolic example inputs."""
    rec = Recording()
    monkeypatch.setattr(compilers, "INDUCTOR",
                        compilers.PieceCompiler("inductor", rec, symbolic=True,
                                                leaves=compilers.INDUCTOR.leaves))
    return rec


@pytest.mark.parametrize("dynamic", [True, False], ids=["symbolic", "per-bucket"])
def test_one_symbolic_compile_serves_every_bucket(symbolic_recorder, dynamic):
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True,
                             options={"piece_compiler": "inductor", "compile_dynamic": dynamic})
    with torch.no_grad():
        for batch in (3, 5, 9, 17, 33, 6):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
    (runner,) = _runners()
    assert len(runner.entries) == 5  # buckets 4, 8, 16, 32, 64
    if dynamic:
        assert runner.compiles == 1 and runner.compilation.dynamic is True
        ((_, example),) = symbolic_recorder.calls
        assert any(isinstance(t, torch.Tensor) and isinstance(t.shape[0], torch.SymInt)
                   for t in example)
    else:
        assert runner.compiles == 5 and runner.compilation.dynamic is None


def test_a_size_outside_the_symbols_range_is_compiled_on_its_own(symbolic_recorder):
    """Dynamo specialises sizes 0 and 1 away (the symbol's range starts at 2): a bucket of 1
    is not handed to the symbolic compile."""
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph", dynamic=True,
                             options={"piece_compiler": "inductor", "bucket_sizes": [1, 4, 8]})
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
    (runner,) = _runners()
    misfit = runner.compilation._symbols.misfit
    static = list(runner.compilation._symbols.example_inputs)
    i = next(i for i, t in enumerate(static)
             if isinstance(t, torch.Tensor) and isinstance(t.shape[0], torch.SymInt))
    static = [torch.empty(1, 8) if j == i else (torch.empty(t.shape) if isinstance(t, torch.Tensor)
              else t) for j, t in enumerate(static)]
    assert "outside" in misfit(static)


def test_inductor_leaves_a_fused_optimizer_kernel_as_is(symbolic_recorder):
    params = [nn.Parameter(torch.randn(5)) for _ in range(3)]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    opts = [torch.optim.Adam(ps, lr=0.1) for ps in (params, ref)]

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        hpuopt.optim.step(opts[0])

    compiled = torch.compile(step, backend="hpugraph", options={"piece_compiler": "inductor"})
    for _ in range(3):
        grads = [torch.randn(5) for _ in params]
        for ps in (params, ref):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        compiled()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opts[1].step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q)
    runners = _runners()
    assert any(r.compilation.left_as_is and "_fused_adam_" in r.compilation.left_as_is
               for r in runners)
    assert hpuopt.counters.compile_fallbacks == 0


def test_inductor_leaves_a_piece_with_an_effect_token_as_is(symbolic_recorder):
    """linalg's error checks thread an effect token through AOTAutograd; Inductor cannot
    compile such a piece again, so it is not handed one."""
    compiled = torch.compile(lambda a: torch.linalg.inv(a) * 2, backend="hpugraph",
                             options={"piece_compiler": "inductor"})
    for _ in range(2):
        a = torch.randn(4, 4) + 4 * torch.eye(4)
        torch.testing.assert_close(compiled(a), torch.linalg.inv(a) * 2)
    left = [r.compilation.left_as_is for r in _runners() if r.compilation.left_as_is]
    if not left:
        pytest.skip("this torch threads no effect token through linalg's checks")
    assert "with_effects" in left[0]
    assert not symbolic_recorder.calls and hpuopt.counters.compile_fallbacks == 0


def test_functional_fused_kernels_keeps_the_update():
    """The rewrite for compilers that trace with AOTAutograd: _fused_adam_ becomes _fused_adam
    and copies back; run as is, it updates the same tensors to the same values."""

    def step(p, g, m, v, s, scale):
        torch.ops.aten._fused_adam_.default([p], [g], [m], [v], [], [s], lr=0.01, beta1=0.9,
                                    beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                                    maximize=False, grad_scale=scale)
        return ()

    gm = torch.fx.symbolic_trace(step)
    args = [torch.randn(6), torch.randn(6), torch.rand(6), torch.rand(6), torch.tensor(3.0),
            torch.tensor(0.5)]
    ref = [a.clone() for a in args]
    step(*ref)
    assert compilers.functional_fused_kernels(gm) == 1
    assert "aten._fused_adam_." not in gm.code and "_foreach_copy_" in gm.code
    gm(*args)
    for a, r in zip(args, ref):
        torch.testing.assert_close(a, r)


# -- Inductor for real ------------------------------------------------------------------------


def test_inductor_pieces_around_a_dynamic_op(dynamic_op_flags):
    """An MLP, a boolean-mask row selection, an MLP: the static pieces compiled by Inductor,
    the selection run as is; fresh random inputs, compared with eager."""
    a = nn.Sequential(nn.Linear(8, 16), nn.GELU())
    b = nn.Sequential(nn.Linear(16, 4), nn.Tanh())

    def f(x):
        h = a(x)
        return b(h[h.norm(dim=-1) > 2.0]).sum(0)

    compiled = torch.compile(f, backend="hpugraph", dynamic=True,
                             options={"piece_compiler": "inductor"})
    with torch.no_grad():
        for batch in (6, 9, 6, 12):
            x = torch.randn(batch, 8) * 2
            torch.testing.assert_close(compiled(x), f(x), rtol=1e-4, atol=1e-5)
    runners = _runners()
    assert runners and all(r.compiler == "inductor" for r in runners)
    assert hpuopt.counters.piece_compiles >= 1 and hpuopt.counters.compile_fallbacks == 0
    assert hpuopt.counters.compile_seconds > 0


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [True, False], ids=["symbolic", "per-bucket"])
def test_inductor_variable_batch_compilations_within_buckets(dynamic):
    model = _mlp()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph", dynamic=True, options={
        "piece_compiler": "inductor", "compile_dynamic": dynamic})
    with torch.no_grad():
        for batch in range(1, 65):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-5)
    buckets = 7  # 1, 2, 4, ..., 64
    assert hpuopt.counters.piece_compiles <= (2 if dynamic else buckets)
