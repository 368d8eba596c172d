"""The CPU runtime's replay writes a graph's outputs straight into its output buffers (out= ops),
as a device graph's kernels do, instead of copying fresh results into them.

Every test compares the replayed outputs with the graph run eagerly on fresh random inputs.
"""

from __future__ import annotations

import logging

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch.fx.experimental.proxy_tensor import make_fx

from hpuopt.runtime.cpu import CpuRuntime
from hpuopt.runtime.entry import flat_forward
from hpuopt.runtime.out_writer import out_overload

aten = torch.ops.aten


def _block(x, w, b, g, beta):
    h = torch.nn.functional.linear(x, w, b)
    a = torch.nn.functional.gelu(h)
    n = torch.nn.functional.layer_norm(a, (a.shape[-1],), g, beta)
    # a view of a result, a reduction viewed, a multi-output op's results, an input, a view of one
    return n, h, a.t(), n.sum(0).view(-1), w, w.t()


def _capture(fn, args, rt=None):
    gm = make_fx(fn)(*args)
    single = not isinstance(next(n for n in gm.graph.nodes if n.op == "output").args[0], tuple)
    static = [a.clone() for a in args]
    rt = rt or CpuRuntime()
    return gm, rt.capture(flat_forward(gm, single), static, warmup_runs=1), static


def _args(rows: int, width: int) -> list[torch.Tensor]:
    return [torch.randn(rows, width), torch.randn(width, width), torch.randn(width),
            torch.randn(width), torch.randn(width)]


def _replays_like_eager(fn, graph, static, fresh_args) -> None:
    outputs = list(graph.static_outputs)
    ptrs = [o.data_ptr() for o in outputs]
    for args in fresh_args:
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        assert [o.data_ptr() for o in graph.static_outputs] == ptrs  # the same buffers
        for got, want in zip(graph.static_outputs, fn(*args)):
            torch.testing.assert_close(got, want)


def test_outputs_are_written_in_place_and_match_eager():
    args = _args(4, 8)
    _, graph, static = _capture(_block, args)
    outs = graph.static_outputs
    # the results of ops are one arena of buffers; the input and its view are the inputs'
    arena = outs[0].untyped_storage().data_ptr()
    assert all(o.untyped_storage().data_ptr() == arena for o in outs[:4])
    assert outs[4].data_ptr() == static[1].data_ptr() == outs[5].data_ptr()
    assert torch.isnan(outs[0]).all()  # garbage until the first replay, like a device graph
    _replays_like_eager(_block, graph, static, [_args(4, 8) for _ in range(3)])


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 9), width=st.integers(1, 12))
def test_any_shape_replays_like_eager(rows, width):
    args = _args(rows, width)
    _, graph, static = _capture(_block, args)
    _replays_like_eager(_block, graph, static, [_args(rows, width) for _ in range(2)])


def test_writes_nothing_when_the_graph_writes_a_computed_value():
    """An op writing to a value the graph computed could write into a buffer: left to the copying
    replay, and still right."""

    def f(x):
        y = x * 2
        y.add_(1)
        return y, x.exp()

    x = torch.randn(5)
    _, graph, static = _capture(f, [x])
    _replays_like_eager(f, graph, static, [[torch.randn(5)] for _ in range(2)])


def test_a_graph_that_mutates_its_input_still_does_so_once():
    def f(x, s):
        s.add_(x)  # a buffer updated in place, like a running statistic
        return (x * s,)

    x, s = torch.randn(6), torch.randn(6)
    _, graph, static = _capture(f, [x, s])
    for _ in range(2):
        before = static[1].clone()
        static[0].copy_(torch.randn(6))
        graph.replay()
        torch.testing.assert_close(static[1], before + static[0])
        torch.testing.assert_close(graph.static_outputs[0], static[0] * static[1])


def test_out_overloads_match_the_functional_schema():
    op, names = out_overload(aten.native_layer_norm.default)
    assert names == ("out0", "out1", "out2") and op._schema.overload_name == "out"
    op, names = out_overload(aten.gelu_backward.default)
    assert names == ("grad_input",)
    op, names = out_overload(aten.sum.dim_IntList)
    assert op is aten.sum.IntList_out
    for no in (aten.t.default, aten.view.default, aten.add_.Tensor, aten.mm.out):
        assert out_overload(no) is None


def _ignores_out(a, b, *, out):
    return torch.mm(a, b) + 0.0


def _raises(a, b, *, out):
    raise RuntimeError("this out= overload refuses its buffer")


@pytest.mark.parametrize("bad", [_ignores_out, _raises], ids=["writes_elsewhere", "raises"])
def test_an_out_op_that_fails_its_buffer_sends_the_graph_back_to_copying(monkeypatch, caplog,
                                                                          bad):
    """The capture's check run (and then the first replay) checks that each written output came
    back as its buffer with the graph's value; an out= overload that raises or returns other
    memory makes the graph copy its outputs for good, and every replay still answers right."""
    import hpuopt.runtime.out_writer as ow

    real = ow.out_overload.__wrapped__
    monkeypatch.setattr(ow, "out_overload",
                        lambda op: (bad, ("out",)) if op is aten.mm.default else real(op))

    def f(a, b):
        return (torch.mm(a, b), a.exp())

    with caplog.at_level(logging.INFO, logger="hpuopt.runtime"):
        _, graph, static = _capture(f, [torch.randn(3, 4), torch.randn(4, 5)])
        _replays_like_eager(f, graph, static, [[torch.randn(3, 4), torch.randn(4, 5)]
                                                for _ in range(3)])
    assert "copies its outputs" in caplog.text


@pytest.mark.parametrize("check_capture", [True, False])
def test_dropout_draws_a_new_mask_each_replay(check_capture):
    def f(x):
        return (torch.nn.functional.dropout(x, 0.5, training=True) * 3,)

    x = torch.rand(256) + 1.0
    _, graph, static = _capture(f, [x], CpuRuntime(check_capture=check_capture))
    masks = []
    for _ in range(3):
        graph.replay()
        out = graph.static_outputs[0]
        kept = out != 0
        torch.testing.assert_close(out[kept], static[0][kept] * 6)
        masks.append(kept.clone())
    assert not torch.equal(masks[0], masks[1])


def _bce(a, b):
    return (torch.nn.functional.binary_cross_entropy(a, b), a * 2)


def _ifft(x):
    return (torch.fft.ifft(x, dim=-1), x.exp())  # ifft of a real input: a lazy _conj of r2c


@pytest.mark.parametrize("fn, make", [
    (_bce, lambda: [torch.rand(5, 5).clamp(0.05, 0.95), torch.rand(5, 5)]),
    (_ifft, lambda: [torch.randn(3, 4, 5)]),
], ids=["bce_out_does_not_reduce", "lazy_conj_output"])
def test_outputs_an_out_overload_would_get_wrong_are_not_written_in_place(fn, make, caplog):
    """``binary_cross_entropy.out`` on the CPU does not reduce as ``binary_cross_entropy`` does,
    and an output that is a lazy conjugate of an op's result is not that result's memory: the
    capture's check run catches the first, the view rule the second; replays equal eager."""
    with caplog.at_level(logging.INFO, logger="hpuopt.runtime.out_writer"):
        _, graph, static = _capture(fn, make())
    _replays_like_eager(fn, graph, static, [make() for _ in range(3)])
    if fn is _bce:
        assert "disagrees with the graph" in caplog.text


def test_a_graph_without_inputs_is_written_in_place():
    def f():
        return (torch.signal.windows.hann(7) * 2, torch.arange(5.0).exp())

    _, graph, static = _capture(f, [])
    _replays_like_eager(f, graph, static, [[], []])


def test_random_ops_pass_the_check_run(caplog):
    """The check run draws the same random numbers as the probe did, so a dropout graph is still
    written in place (and the random state advances as for one run)."""
    def f(x):
        return (torch.nn.functional.dropout(x, 0.5, training=True) * 3, x.sum(0))

    x = torch.rand(64) + 1.0
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="hpuopt.runtime.out_writer"):
        _capture(f, [x])
    assert "disagrees" not in caplog.text
