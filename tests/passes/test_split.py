"""The split pass alone, on graphs built by hand and by make_fx: which nodes split, the recorded
reasons, convexity and the order of side effects."""

from __future__ import annotations

import itertools
import operator

import pytest
import torch
import torch.fx

from hpuopt import Config, ConfigError
from hpuopt.passes.split import SplitPass, assign_partitions, classify
from hpuopt.testing import aten_graph, count_ops

aten = torch.ops.aten


def _pieces(result):
    return {p.name: p for p in result.findings}


def _run_split(gm, **options):
    return SplitPass()(gm, Config.from_options(options, environ={}))


def test_static_graph_is_one_static_piece():
    gm = aten_graph(lambda x, w: torch.relu(x @ w).sum(1), torch.randn(4, 8), torch.randn(8, 3))
    result = _run_split(gm)
    assert not result.modified
    assert [p.static for p in result.findings] == [True]


def test_boolean_mask_splits_with_reason_and_source():
    def f(x):
        y = x.sin()
        z = y[y > 0]  # the dynamic op
        return z * 2, y.cos()

    gm = aten_graph(f, torch.randn(6, 5), tracing_mode="symbolic")
    result = _run_split(gm)
    pieces = result.findings
    dynamic = [p for p in pieces if not p.static]
    assert len(dynamic) == 1
    (reason,) = [r for r in dynamic[0].reasons if r.reason == "data_dependent_shape"]
    assert reason.op.startswith("aten.index") or reason.op.startswith("aten.nonzero")
    # nothing dynamic in a static piece; the dynamic op is not in any static piece
    for p in pieces:
        if p.static:
            assert not any(o.startswith(("aten.nonzero", "aten.index.Tensor")) for o in p.ops)
    # cos(y) does not depend on the mask: it stays with sin in the first static piece
    assert "aten.cos.default" in pieces[0].ops and pieces[0].static
    x = torch.randn(6, 5)
    for a, b in zip(result.graph_module(x), gm(x)):
        torch.testing.assert_close(a, b)


def test_split_reasons_carry_the_user_source_line(dynamic_op_flags):
    from hpuopt.testing import RecordingBackend

    def f(x):
        y = x.sin()
        z = y[y > 0]  # the dynamic op
        return z * 2

    backend = RecordingBackend()
    x = torch.randn(6, 5)
    torch.testing.assert_close(torch.compile(f, backend=backend)(x), f(x))
    (snap,) = backend.graphs("post_aot")
    split = snap.result.results["split"]
    sources = [r.source for p in split.findings for r in p.reasons]
    assert any(s and "z = y[y > 0]" in s and "test_split.py" in s for s in sources), sources


def test_item_is_host_read_and_its_consumer_stays_out_of_static_pieces():
    def f(x):
        s = x.abs().sum().item()
        return x * s

    gm = aten_graph(f, torch.randn(3, 4), tracing_mode="symbolic")
    reasons = {r.reason for r in classify(gm).values()}
    assert "host_read" in reasons
    assert "host_scalar" in reasons  # the multiply by a data-dependent float
    result = _run_split(gm)
    x = torch.randn(3, 4)
    torch.testing.assert_close(result.graph_module(x), gm(x))


def _hand_graph_with_mutation():
    """x.add_(1) ; m = nonzero(x > 0) ; x.mul_(2) ; return x + 1, m — built with fx.Graph."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(aten.add_.Tensor, (x, 1.0))
    gt = g.call_function(aten.gt.Scalar, (x, 0.0))
    nz = g.call_function(aten.nonzero.default, (gt,))
    m = g.call_function(aten.mul_.Tensor, (x, 2.0))
    out = g.call_function(aten.add.Tensor, (x, 1.0))
    for node, name in ((a, "add_"), (gt, "gt"), (nz, "nonzero"), (m, "mul_"), (out, "add")):
        node.name = name
    g.output((out, nz))
    for n in (a, m):
        assert n.is_impure()
    return torch.fx.GraphModule({}, g)


def test_side_effects_keep_their_order_around_a_dynamic_op():
    gm = _hand_graph_with_mutation()
    dynamic = classify(gm)  # no metadata: only the op set marks nonzero
    assert [n.name for n in dynamic] == ["nonzero"]
    assert dynamic[next(iter(dynamic))].reason == "known_uncapturable"
    part = assign_partitions(gm, dynamic)
    by_name = {n.name: p for n, p in part.items()}
    # add_ before gt/nonzero, nonzero before mul_, mul_ before the final add
    assert by_name["add_"] <= by_name["gt"] < by_name["nonzero"] < by_name["mul_"]
    assert by_name["mul_"] <= by_name["add"]
    result = _run_split(gm)
    x1 = torch.randn(7)
    x2 = x1.clone()
    out1 = result.graph_module(x1)
    out2 = gm(x2)
    torch.testing.assert_close(out1[0], out2[0])
    torch.testing.assert_close(out1[1], out2[1])
    torch.testing.assert_close(x1, x2)  # the mutations happened once, in order


def test_partition_ids_never_decrease_along_edges():
    def f(x, w):
        h = x @ w
        idx = torch.nonzero(h > 0)
        k = h.sum() + idx.shape[0]
        v = torch.unique(h.round())
        return h.relu() * k, v.float().mean()

    gm = aten_graph(f, torch.randn(5, 4), torch.randn(4, 4), tracing_mode="symbolic")
    dynamic = classify(gm)
    part = assign_partitions(gm, dynamic)
    for node, p in part.items():
        if node.target is operator.getitem:  # unpacking stays with the node it unpacks
            assert p == part[node.args[0]]
            continue
        assert (p % 2 == 1) == (node in dynamic)
        for i in node.all_input_nodes:
            if i in part:
                assert part[i] <= p, (i.name, node.name)
    result = _run_split(gm)
    x, w = torch.randn(5, 4), torch.randn(4, 4)
    for a, b in zip(result.graph_module(x, w), gm(x, w)):
        torch.testing.assert_close(a, b)


def test_user_dynamic_ops_from_config():
    gm = aten_graph(lambda x: x.sin().cos().exp(), torch.randn(4))
    result = _run_split(gm, dynamic_ops=["aten.cos"])
    pieces = result.findings
    assert [p.static for p in pieces] == [True, False, True]
    assert pieces[1].reasons[0].reason == "known_uncapturable"
    assert pieces[1].ops == ("aten.cos.default",)
    # an overload name works too
    pieces2 = _run_split(gm, dynamic_ops=["aten.cos.default"]).findings
    assert [p.static for p in pieces2] == [True, False, True]


def test_unknown_user_dynamic_op_is_a_clear_error():
    gm = aten_graph(lambda x: x.sin(), torch.randn(4))
    with pytest.raises(ConfigError, match="aten.not_an_op"):
        _run_split(gm, dynamic_ops=["aten.not_an_op"])


def test_device_copy_is_split():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(aten.sin.default, (x,))
    z = g.call_function(aten._to_copy.default, (y,), {"device": torch.device("meta")})
    g.output((z,))
    gm = torch.fx.GraphModule({}, g)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = torch.empty(3)
        x.meta["val"] = fx
        y.meta["val"] = fx.sin()
        z.meta["val"] = torch.empty(3, device="meta")
    del mode
    reasons = classify(gm)
    assert [r.reason for r in reasons.values()] == ["device_copy"]


def test_split_keeps_symbolic_sizes_across_pieces():
    """A size read after the dynamic op feeds a static piece as a SymInt argument."""

    def f(x):
        y = x[x > 0]
        n = y.shape[0]
        return y.reshape(n, 1).expand(n, 3) * 2

    gm = aten_graph(f, torch.randn(9), tracing_mode="symbolic")
    result = _run_split(gm)
    for _ in range(3):
        x = torch.randn(9)
        torch.testing.assert_close(result.graph_module(x), gm(x))
    assert count_ops(result.graph_module, operator.getitem) >= 0  # the split graph is countable


def test_views_of_inputs_are_recomputed_in_each_piece_not_passed_across():
    """w.t() computed before the dynamic op and used after it must not cross as an activation:
    the later piece takes ``w`` itself (a stable parameter) and transposes it again."""

    def f(x, w):
        wt = w.t()
        h = x @ wt
        kept = h[h.sum(-1) > 0]
        return kept @ wt

    gm = aten_graph(f, torch.randn(6, 4), torch.randn(4, 4), tracing_mode="symbolic")
    result = _run_split(gm)
    split_gm = result.graph_module
    w_node = [n for n in split_gm.graph.nodes if n.op == "placeholder"][1]
    last = [n for n in split_gm.graph.nodes if n.op == "call_module"][-1]
    assert w_node in last.args  # the parameter itself, not a transposed activation
    sub = split_gm._modules[last.target]
    assert count_ops(sub, aten.t) == 1
    for _ in range(3):
        x, w = torch.randn(6, 4), torch.randn(4, 4)
        torch.testing.assert_close(split_gm(x, w), gm(x, w))


def test_collectives_are_split_out():
    """A collective must run exactly once per call in step with the other ranks: never inside
    a captured piece, whose warm-up and capture runs would repeat it."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(aten.relu.default, (x,))
    ar = g.call_function(torch.ops._c10d_functional.all_reduce.default, (y, "sum", "0"))
    w = g.call_function(torch.ops._c10d_functional.wait_tensor.default, (ar,))
    g.output((g.call_function(aten.mul.Tensor, (w, 2.0)),))
    gm = torch.fx.GraphModule({}, g)
    reasons = classify(gm)
    assert {r.reason for r in reasons.values()} == {"collective"}
    assert {n.name for n in reasons} == {ar.name, w.name}


def test_masked_assignment_is_split_out():
    def f(x):
        y = torch.sin(x)
        y[y < 0] = 0.0
        return y * 2

    gm = aten_graph(f, torch.randn(5, 3), tracing_mode="symbolic")
    ops = [r.op for r in classify(gm).values()]
    assert len(ops) == 1 and ops[0].startswith("aten.index_put")
    result = _run_split(gm)
    x = torch.randn(5, 3)
    torch.testing.assert_close(result.graph_module(x), f(x.clone()))


def test_assert_only_piece_survives_cleanup(dynamic_op_flags):
    """A piece holding only host asserts is impure: dead-code elimination keeps it."""
    from hpuopt.passes.mark_step import mark_step
    from hpuopt.testing import RecordingBackend

    lin = torch.nn.Linear(4, 4)

    def f(x):
        t = lin(x)
        return torch.relu(t[torch.where(t > 0)])

    backend = RecordingBackend()
    torch.compile(f, backend=backend)(torch.randn(3, 4)).sum().backward()
    (bwd,) = backend.graphs("post_aot", kind="backward")
    nodes = list(bwd.after.graph.nodes)
    for a, b in itertools.pairwise(nodes):  # no two boundaries back to back
        assert not (a.target is mark_step and b.target is mark_step), bwd.after.code


def _graph_returning(outputs: str) -> torch.fx.GraphModule:
    """A hand-built one-piece graph: inputs a (used), b (only returned), c (unused), and an
    output of the given shape ("none", "one", "several", "with_input")."""
    g = torch.fx.Graph()
    a, b, _c = g.placeholder("a"), g.placeholder("b"), g.placeholder("c")
    s = g.call_function(aten.sin.default, (a,))
    t = g.call_function(aten.mul.Tensor, (s, a))
    g.call_function(aten.add_.Tensor, (a, 1.0))  # a write: the piece must stay impure
    out = {"none": (), "one": (t,), "several": (t, s, t), "with_input": (s, b, None)}[outputs]
    g.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("outputs", ["none", "one", "several", "with_input"])
def test_one_piece_split_is_split_module_without_its_cost(outputs):
    from torch.fx.passes.split_module import split_module

    from hpuopt.passes.split import build_pieces

    gm = _graph_returning(outputs)
    assignment = {n: 0 for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    mine, (info,) = build_pieces(gm, assignment, {})
    theirs = split_module(_graph_returning(outputs), None, lambda n: 0, keep_original_order=True)
    (call,) = mine.graph.find_nodes(op="call_module")
    (their_call,) = theirs.graph.find_nodes(op="call_module")
    assert call.meta["hpuopt.piece"] is info and info.static
    assert [a.name for a in call.args] == [a.name for a in their_call.args] == ["a"]
    assert mine.submod_0._is_impure  # kept by dead-code elimination despite no outputs
    for split in (mine, theirs):  # same results and same write to ``a`` as the original
        x, y, z = torch.randn(5), torch.randn(5), torch.randn(5)
        x_ref = x.clone()
        want = _graph_returning(outputs)(x_ref, y, z)
        got = split(x, y, z)
        torch.testing.assert_close(x, x_ref)
        assert len(got) == len(want)
        for g_, w_ in zip(got, want):
            if w_ is None:
                assert g_ is None
            else:
                torch.testing.assert_close(g_, w_)


def test_histc_is_judged_by_its_range():
    """``histc`` with ``min < max`` counts into fixed bins (transformers' grouped experts count
    the tokens per expert so): static. Without a range (``min == max``, the default) the kernel
    reads the data's minimum and maximum: split out, with the reason."""

    def ranged(x):
        return torch.histc(x.sin(), bins=4, min=-1, max=1).cumsum(0)

    def unranged(x):
        return torch.histc(x.sin(), bins=4).cumsum(0)

    def equal_bounds(x):
        return torch.histc(x.sin(), bins=4, min=0.5, max=0.5) * 2

    x = torch.randn(3, 8)
    gm = aten_graph(ranged, x)
    assert classify(gm) == {}
    result = _run_split(gm)
    assert [p.static for p in result.findings] == [True]
    torch.testing.assert_close(result.graph_module(x), ranged(x))
    for f in (unranged, equal_bounds):
        gm = aten_graph(f, x)
        (reason,) = classify(gm).values()
        assert (reason.op, reason.reason) == ("aten.histc.default", "known_uncapturable")
        assert [p.static for p in _run_split(gm).findings] == [True, False, True]


def test_captured_histc_with_a_range_replays(dynamic_op_flags):
    """The runtime agrees with the split: a ranged ``histc`` is captured and replayed, the
    counts following the data on every replay."""
    from hpuopt.testing import RecordingBackend

    def f(x):
        return torch.histc(x * 2, bins=5, min=0, max=4) + 1

    backend = RecordingBackend()
    compiled = torch.compile(f, backend=backend, dynamic=False)
    for seed in range(3):
        x = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(seed)).float()
        torch.testing.assert_close(compiled(x), f(x))
    (snap,) = backend.graphs("post_aot")
    assert [p.static for p in snap.result.results["split"].findings] == [True]
    pieces = [p for g in backend.explain().graphs for a in g.aot_graphs for p in a.pieces]
    assert [(p.captured, p.replays) for p in pieces] == [(True, 3)]
