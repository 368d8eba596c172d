"""The CPU runtime's replay program: a graph as straight-line calls of each op's fastest entry
point proven to dispatch the same overload with the same arguments.

Every test compares the program with the graph's own forward on fresh random inputs (not the
inputs the entry points were chosen on), and checks what it dispatched.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch.fx.experimental.proxy_tensor import make_fx

from hpuopt.runtime.cpu import CpuRuntime
from hpuopt.runtime.entry import flat_forward
from hpuopt.runtime.replay_program import _Dispatched, mutates_arguments, replay_program


def _shape(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return (type(value), value)


def _dispatched(fn, args):
    """What ``fn(*args)`` dispatched: each overload with its arguments' types and values (tensors
    by dtype and shape)."""
    with _Dispatched() as mode:
        fn(*args)
    return [(func, _shape(a), _shape(k)) for func, a, k in mode.calls]


def _same_results(got, want):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
        else:
            assert g == w


def _block(x, w, b, g, beta):
    h = torch.nn.functional.linear(x, w, b)
    a = torch.nn.functional.gelu(h, approximate="tanh")
    n = torch.nn.functional.layer_norm(a, (a.shape[-1],), g, beta, eps=1e-5)
    return n, h.t(), n.sum([0], keepdim=True), torch.nn.functional.mse_loss(a, n)


def _masks(x, w, b, g, beta):
    keep = x > 0.25
    filled = x.masked_fill(~keep, float("-inf")).softmax(-1)
    low = torch.clamp(w, min=-0.5, max=float("inf")).to(torch.float64).half()
    idx = x.argmax(-1)
    picked = w[idx] * 2 + b.expand(x.shape[0], -1)
    return filled, low, picked, torch.cat([g, beta, g * -0.0]), idx + 3, torch.where(keep, x, 1.5)


def _args(rows, width, gen=None):
    return [torch.randn(rows, width, generator=gen), torch.randn(width, width, generator=gen),
            torch.randn(width, generator=gen), torch.randn(width, generator=gen),
            torch.randn(width, generator=gen)]


@pytest.mark.parametrize("fn", [_block, _masks], ids=["block", "masks"])
def test_program_equals_the_graph_and_dispatches_the_same(fn):
    gen = torch.Generator().manual_seed(0)
    gm = make_fx(fn)(*_args(4, 8, gen))
    program = replay_program(gm, _args(4, 8, gen))
    assert program is not None
    for _ in range(3):
        fresh = _args(4, 8, gen)
        _same_results(program(*fresh), gm(*fresh))
        assert _dispatched(program, fresh) == _dispatched(gm, fresh)


def test_a_binding_with_another_default_is_not_used():
    """``torch._C._nn.mse_loss(a, b)`` reaches ``mse_loss.default`` without reducing: the
    overload reduces by default. The program must reduce."""
    a, b = torch.randn(5, 5), torch.randn(5, 5)
    gm = make_fx(lambda a, b: torch.nn.functional.mse_loss(a, b))(a, b)
    program = replay_program(gm, [a, b])
    a2, b2 = torch.randn(5, 5), torch.randn(5, 5)
    assert program(a2, b2).shape == ()
    torch.testing.assert_close(program(a2, b2), torch.nn.functional.mse_loss(a2, b2))


_UNARY = {
    "add": lambda x, c: x + c,
    "mul": lambda x, c: x * c,
    "clamp_min": lambda x, c: x.clamp(min=c),
    "fill_lt": lambda x, c: x.masked_fill(x < 0, c),
    "pow": lambda x, c: x.abs().pow(abs(c) if math.isfinite(c) else 2.0),
    "full_like": lambda x, c: torch.full_like(x, c),
    "sum_dims": lambda x, c: x - x.sum([-1], keepdim=True) / (c if c else 3.0),
}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(sorted(_UNARY)), min_size=1, max_size=5),
       st.floats(allow_nan=True, allow_infinity=True, width=32),
       st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_random_chains_with_any_constant(ops, constant, rows, seed):
    """Constants of every kind (NaN, infinities, -0.0, tiny and huge floats) reach the ops as
    the graph has them."""

    def fn(x):
        outs = []
        for name in ops:
            x = _UNARY[name](x, constant)
            outs.append(x)
        return tuple(outs)

    gen = torch.Generator().manual_seed(seed)
    gm = make_fx(fn)(torch.randn(rows, 3, generator=gen))
    program = replay_program(gm, [torch.randn(rows, 3, generator=gen)])
    assert program is not None
    fresh = torch.randn(rows, 3, generator=gen)
    _same_results(program(fresh), gm(fresh))


def test_a_graph_writing_its_input_writes_it_once_per_replay():
    def fn(x, y):
        x.add_(y)
        return x * 2

    x, y = torch.randn(3, 4), torch.randn(3, 4)
    gm = make_fx(fn)(x.clone(), y)
    assert mutates_arguments(gm)
    static = [x.clone(), y.clone()]
    graph = CpuRuntime().capture(flat_forward(gm, True), static, warmup_runs=1,
                                 warmup_inputs=[x.clone(), y.clone()])
    assert torch.equal(static[0], x)  # capture left the static input as it was
    graph.replay()
    torch.testing.assert_close(static[0], x + y)
    torch.testing.assert_close(graph.static_outputs[0], (x + y) * 2)
    graph.replay()
    torch.testing.assert_close(static[0], x + 2 * y)


def test_graphs_it_does_not_apply_to():
    class WithModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x).relu()

    traced = torch.fx.symbolic_trace(WithModule())
    assert replay_program(traced, [torch.randn(2, 3)]) is None  # a call_module node

    gm = make_fx(lambda x: x.view(6))(torch.randn(2, 3))
    assert replay_program(gm, [torch.randn(3, 3)]) is None  # the choosing run raised


def test_the_cpu_runtime_replays_through_the_program(monkeypatch):
    from hpuopt.runtime import cpu

    built = []
    monkeypatch.setattr(cpu, "replay_program",
                        lambda gm, inputs: built.append(replay_program(gm, inputs)) or built[-1])
    gen = torch.Generator().manual_seed(1)
    args = _args(4, 8, gen)
    gm = make_fx(_block)(*args)
    static = [a.clone() for a in args]
    graph = CpuRuntime().capture(flat_forward(gm, False), static, warmup_runs=1)
    assert built and built[0] is not None
    for _ in range(2):
        fresh = _args(4, 8, gen)
        for s, a in zip(static, fresh):
            s.copy_(a)
        mode = _Dispatched()
        with mode:
            graph.replay()
        # the graph's ops, in order (those producing outputs through their out= overloads)
        names = [c[0]._schema.name for c in _dispatched_funcs(gm, fresh)]
        assert [c[0]._schema.name for c in mode.calls] == names
        assert any(c[0]._overloadname == "out" for c in mode.calls)
        _same_results(list(graph.static_outputs), list(gm(*fresh)))


def _dispatched_funcs(gm, args):
    with _Dispatched() as mode:
        gm(*args)
    return mode.calls
