"""The split on graphs that carry CUDA metadata (fake tensors on a CPU-only build): what a GPU run
would decide on the host. Host tensors and capture-unsafe ops never reach a static piece."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from hpuopt import Config
from hpuopt.passes.split import SplitPass, classify

aten = torch.ops.aten


def cuda_graph(fn, *shapes_and_devices):
    """``fn`` traced to an ATen graph whose values live on the given (fake) devices."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        inputs = [torch.empty(shape, device=device) for shape, device in shapes_and_devices]
    return make_fx(fn, tracing_mode="fake")(*inputs)


def reasons_by_op(gm):
    return {r.op: r.reason for r in classify(gm).values()}


def static_ops(gm):
    result = SplitPass()(gm, Config())
    return {
        op
        for piece in result.findings
        if piece.static
        for op in piece.ops
    }


def test_cpu_scalar_op_in_a_cuda_graph_runs_outside_captured_pieces():
    def f(x, s):
        return x * (s + 1)  # s + 1 computes on the CPU: its value must not be baked in

    gm = cuda_graph(f, ((4, 8), "cuda"), ((), "cpu"))
    found = reasons_by_op(gm)
    assert found == {"aten.add.Tensor": "host_tensor"}
    assert "aten.add.Tensor" not in static_ops(cuda_graph(f, ((4, 8), "cuda"), ((), "cpu")))


@pytest.mark.parametrize("shape", [(), (3,)])
def test_cpu_ops_of_any_rank_are_host_tensor_ops(shape):
    def f(x, t):
        return x.sum() + (t * 2).sum().to(x.device)

    found = classify(cuda_graph(f, ((4,), "cuda"), (shape, "cpu")))
    assert {r.reason for r in found.values()} >= {"host_tensor"}
    assert all(r.op != "aten.sum.default" or r.reason in ("host_tensor", "device_copy")
               for r in found.values())


def test_a_cpu_only_graph_is_not_split_for_host_tensors():
    def f(x, s):
        return x * (s + 1)

    gm = cuda_graph(f, ((4, 8), "cpu"), ((), "cpu"))
    assert classify(gm) == {}


def test_linalg_error_check_is_split_out():
    gm = cuda_graph(lambda a: torch.linalg.inv(a) @ a, ((4, 4), "cuda"))
    found = reasons_by_op(gm)
    assert found == {"aten._linalg_check_errors.default": "host_read"}
    result = SplitPass()(gm, Config())
    dynamic = [p for p in result.findings if not p.static]
    assert [p.ops for p in dynamic] == [("aten._linalg_check_errors.default",)]
    assert "error code" in dynamic[0].reasons[0].detail


def test_cond_on_a_device_predicate_is_split_out():
    def f(x):
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (x,))

    gm = cuda_graph(f, ((4,), "cuda"))
    found = [r for r in classify(gm).values() if r.op.endswith("cond")]
    assert len(found) == 1 and found[0].reason == "host_read"
    assert "predicate" in found[0].detail


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="no such tag in this torch")
def test_ops_tagged_cudagraph_unsafe_are_split_out():
    lib = torch.library.Library("hpuopt_test_split", "FRAGMENT")  # noqa: TOR901
    lib.define("unsafe(Tensor x) -> Tensor", tags=[torch.Tag.cudagraph_unsafe])
    lib.impl("unsafe", lambda x: x.clone(), "CompositeExplicitAutograd")
    lib.impl("unsafe", lambda x: torch.empty_like(x), "Meta")
    op = torch.ops.hpuopt_test_split.unsafe.default
    gm = cuda_graph(lambda x: op(x * 2) + 1, ((4,), "cuda"))
    found = reasons_by_op(gm)
    assert found == {str(op): "known_uncapturable"}
    assert str(op) not in static_ops(gm)


def test_transformers_grouped_mm_fallback_is_a_host_read_on_a_device_only():
    """transformers' grouped matmul fallback calls ``offs.tolist()`` inside the custom op: on a
    CUDA graph that is a host read (split out); on the CPU it stays in a static piece."""
    pytest.importorskip("transformers.integrations.moe")
    grouped = torch.ops.transformers.grouped_mm_fallback

    def f(x, w, offs):
        return grouped(x.relu(), w, offs=offs) * 2

    shapes = ((6, 4), (3, 4, 5), (3,))
    with FakeTensorMode(allow_non_fake_inputs=False):
        inputs = [torch.empty(shapes[0], device="cuda"), torch.empty(shapes[1], device="cuda"),
                  torch.empty(shapes[2], device="cuda", dtype=torch.int32)]
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    (found,) = [r for r in classify(gm).values() if "grouped_mm_fallback" in r.op]
    assert found.reason == "host_read" and "offs.tolist()" in found.detail
    assert {"aten.relu", "aten.mul"} <= {".".join(op.split(".")[:2]) for op in static_ops(gm)}

    x, w = torch.randn(6, 4), torch.randn(3, 4, 5)
    offs = torch.tensor([2, 5, 6], dtype=torch.int32)
    cpu = make_fx(f)(x, w, offs)
    assert not any("grouped_mm_fallback" in op for op in reasons_by_op(cpu))
