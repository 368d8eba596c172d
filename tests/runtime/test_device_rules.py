"""Runner rules decided on the host for a device run: CPU inputs of a device piece, the address
check, lent outputs across a piece's graphs. Graphs with CUDA metadata come from fake tensors,
so these run without a GPU; the `cuda` tests show the same on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import hpuopt
from hpuopt.runtime import entry as entry_module
from hpuopt.runtime.cpu import CpuRuntime
from hpuopt.runtime.entry import capture, flat_forward
from hpuopt.runtime.signature import EXACT_KEYS, arg_roles

cuda = pytest.mark.cuda


def _fake_graph(fn, *specs):
    with FakeTensorMode():
        inputs = [torch.empty(shape, device=device) for shape, device in specs]
    return make_fx(fn, tracing_mode="fake")(*inputs)


def test_a_cpu_scalar_read_by_a_cuda_piece_is_copied_never_read_in_place():
    gm = _fake_graph(lambda x, s: x * s, ((4, 8), "cuda"), ((), "cpu"))
    roles = arg_roles(gm, stable=[False, True])  # even if the caller calls it stable
    assert roles.host == (1,) and roles.device == "cuda:0"
    assert 1 in roles.copied and 1 not in roles.stable
    lr = nn.Parameter(torch.tensor(0.1))  # a CPU parameter stays copied too
    assert 1 not in roles.adopt([torch.empty(4, 8), lr]).stable
    assert 1 not in roles.with_split(stable=[0, 1], copied=[]).stable


def test_a_cpu_piece_has_no_host_inputs():
    gm = _fake_graph(lambda x, s: x * s, ((4, 8), "cpu"), ((), "cpu"))
    roles = arg_roles(gm, stable=[False, False])
    assert roles.host == () and roles.device is None


def _python_ptrs_equal(tensors, data_ptrs, indices):
    """torch's C++ comparison, as ``torch/csrc/cuda/Module.cpp`` defines it."""
    assert isinstance(tensors, list) and isinstance(data_ptrs, list)
    return all(tensors[i].data_ptr() == data_ptrs[i] for i in indices)


@pytest.mark.parametrize("cpp", [False, True], ids=["python", "c++ form"])
@pytest.mark.parametrize("stable", [(), (0,), (0, 2), (0, 1, 2)])
def test_the_address_check_sees_every_moved_stable_input(monkeypatch, cpp, stable):
    if cpp:
        monkeypatch.setattr(entry_module, "_PTRS_EQUAL", _python_ptrs_equal)
    gm = make_fx(lambda a, b, c: a + b * c)(torch.randn(3), torch.randn(3), torch.randn(3))
    roles = arg_roles(gm, stable=[i in stable for i in range(3)])
    args = (torch.randn(3), torch.randn(3), torch.randn(3))
    entry = capture(CpuRuntime(), flat_forward(gm, True), roles, args, EXACT_KEYS, 0, [True])
    assert entry.same_addresses(args)
    for i in range(3):
        moved = list(args)
        moved[i] = args[i].clone()
        assert entry.same_addresses(tuple(moved)) == (i not in stable)


def test_lent_outputs_go_stale_when_another_graph_of_the_piece_replays():
    def f(x):
        return torch.sin(x) * 2

    compiled = torch.compile(f, backend="hpugraph", dynamic=True,
                             options={"clone_outputs": False, "padding": False})
    kept = compiled(torch.randn(3))
    with pytest.warns(UserWarning, match="overwrites an output"):
        compiled(torch.randn(3))  # the same graph replays: the first output is stale
    assert hpuopt.counters.stale_outputs == 1
    kept = compiled(torch.randn(5))  # a new graph of the same piece: captured, then replays
    compiled(torch.randn(7))  # another graph of the piece: what the 5-element one lent is stale
    assert hpuopt.counters.stale_outputs == 2
    del kept


# -- the same on a GPU --------------------------------------------------------------------


@cuda
def test_a_cpu_scalar_that_changes_between_calls_is_read_each_call():
    lin = nn.Linear(16, 16).cuda()

    def f(x, s):
        return lin(x) * s + s

    compiled = torch.compile(f, backend="hpugraph")
    with torch.no_grad():
        for value in (0.5, -1.25, 3.0, 0.0, 7.5):
            x, s = torch.randn(4, 16, device="cuda"), torch.tensor(value)
            torch.testing.assert_close(compiled(x, s), f(x, s))


@cuda
def test_a_skip_connection_across_a_dynamic_piece_survives_a_recapture(dynamic_op_flags):
    lin1, lin2 = nn.Linear(16, 16).cuda(), nn.Linear(16, 16).cuda()

    def f(x):
        h = lin1(x)                       # piece A
        kept = h[h.sum(-1) > 0]           # dynamic
        g = lin2(kept).sum(0)             # piece B
        return h * 2 + g                  # B reads h from A, across the dynamic piece

    compiled = torch.compile(f, backend="hpugraph")
    with torch.no_grad():
        for step in range(6):
            if step == 3:  # the producer is captured again, after B
                lin1.weight.data = torch.randn_like(lin1.weight)
            x = torch.randn(32, 16, device="cuda")
            torch.testing.assert_close(compiled(x), f(x))
