"""The seed documents' scenarios through the backend, against eager, with the Dynamo dynamic-op
flags off (Dynamo breaks the graph at each dynamic op) and on (hpuopt splits them itself)."""

from __future__ import annotations

import copy
import itertools
import os
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpuopt


# about 20 s of Inductor compiles on two cores (forward, backward and SGD pieces, two batch sizes)
SLOW_WITH_INDUCTOR = {"test_mnist_training_with_smaller_last_batch"}


@pytest.fixture(autouse=True, params=["eager", "inductor", "direct"],
                ids=["eager-pieces", "inductor-pieces", "direct-runtime"])
def piece_compiler(request, monkeypatch):
    """Every scenario with the pieces captured as their ATen ops, compiled by Inductor first
    (``piece_compiler="inductor"``), and called directly without capture (``runtime="direct"``,
    ATen pieces: the direct runner's semantics without compile time); given as variables so the
    scenarios stay as a user writes them. Inductor compiles cost seconds: by default the
    Inductor runs are those where hpuopt splits the dynamic ops itself (the flags on), but for
    SLOW_WITH_INDUCTOR; all of them with RUN_SLOW_TESTS=1."""
    params = getattr(request.node, "callspec", None)
    flags = params.params.get("both_flag_settings", True) if params is not None else True
    slow = not flags or request.node.originalname in SLOW_WITH_INDUCTOR
    if request.param == "inductor" and slow and os.environ.get("RUN_SLOW_TESTS") != "1":
        pytest.skip("slow with Inductor pieces (RUN_SLOW_TESTS=1)")
    if request.param == "direct":
        monkeypatch.setenv("HPUOPT_RUNTIME", "direct")
        monkeypatch.setenv("HPUOPT_PIECE_COMPILER", "eager")
    else:
        monkeypatch.setenv("HPUOPT_PIECE_COMPILER", request.param)
    yield request.param
    if request.param == "direct":  # nothing captured, nothing copied, pieces still ran
        c = hpuopt.counters
        assert c.graphs_captured == c.static_copies == c.output_clones == 0
        assert c.replays > 0 or c.pieces_static == 0
    if request.param == "inductor":  # the scenarios did go through Inductor
        assert hpuopt.counters.piece_compiles + hpuopt.counters.compile_fallbacks > 0 or \
            hpuopt.counters.pieces_static == 0


class Net(nn.Module):
    """Seed 003's MNIST network."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


def _grads(params):
    return [p.grad.clone() for p in params]


def test_mnist_training_with_smaller_last_batch(both_flag_settings):
    """Batches of 200 and a smaller last one (drop-last off): losses, gradients and parameters
    after each SGD step equal eager's."""
    model = Net()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for batch in (200, 200, 200, 37, 200, 37):
        data = torch.randn(batch, 1, 28, 28)
        target = torch.randint(0, 10, (batch,))
        for m, o in ((compiled, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            loss = F.nll_loss(m(data), target)
            loss.backward()
            o.step()
            m.last_loss = loss.detach()
        torch.testing.assert_close(compiled.last_loss, ref.last_loss)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
    assert hpuopt.counters.replays > 0
    # the two batch sizes are two cache entries per piece, not a capture per call
    assert hpuopt.counters.graphs_captured <= 2 * hpuopt.counters.aot_graphs


def test_mnist_inference_explain_reports_cache(both_flag_settings):
    model = Net().eval()
    compiled = hpuopt.compile(model)
    with torch.no_grad():
        for batch in (200, 200, 13):
            x = torch.randn(batch, 1, 28, 28)
            torch.testing.assert_close(compiled(x), model(x))
    report = compiled.explain()
    captured = [p for p in report.pieces if p.captured]
    assert captured and sum(p.replays for p in captured) >= 3
    assert "graph 0" in str(report)


def _dynamic_op_modules():
    module1 = nn.Linear(10, 3)
    module2 = nn.ReLU()
    return module1, module2


def test_dynamic_op_between_modules_forward_and_grads(both_flag_settings):
    """Seed 003: module1 -> t[torch.where(t > 0)] -> module2, loss |mean - target|."""
    module1, module2 = _dynamic_op_modules()
    ref1 = copy.deepcopy(module1)

    def step(m1, data, target):
        tmp = m1(data)
        tmp = tmp[torch.where(tmp > 0)]
        tmp = module2(tmp)
        return torch.abs(tmp.mean() - target)

    compiled = torch.compile(step, backend="hpugraph")
    for _ in range(6):
        data = torch.randn(5, 10)
        target = data.mean()
        loss = compiled(module1, data, target)
        ref_loss = step(ref1, data, target)
        if torch.isnan(ref_loss):  # no positive entry: both sides must agree on NaN
            assert torch.isnan(loss)
            continue
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss)
        for p, q in zip(module1.parameters(), ref1.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
            p.grad = q.grad = None
    if both_flag_settings:  # the dynamic op is inside the graph: hpuopt split it
        report = hpuopt.explain()
        reasons = {r.reason for r in report.splits}
        assert "data_dependent_shape" in reasons
        assert any("torch.where" in (r.source or "") for r in report.splits)


def test_dynamic_control_flow_between_modules(both_flag_settings):
    """Seed 003: module1 feeds module2 or module3 by a branch, each module compiled alone, with
    an Adadelta step; parameters equal eager's after every step."""
    mods = [nn.Linear(784, 128), nn.Linear(128, 100), nn.Linear(128, 50)]
    refs = copy.deepcopy(mods)
    compiled = [torch.compile(m, backend="hpugraph") for m in mods]
    opt = torch.optim.Adadelta(itertools.chain(*(m.parameters() for m in mods)), lr=0.1)
    ref_opt = torch.optim.Adadelta(itertools.chain(*(m.parameters() for m in refs)), lr=0.1)
    rng = random.Random(0)
    for _ in range(8):
        data = torch.rand(5, 784)
        target = data.mean()
        path = rng.random() > 0.5
        for (m1, m2, m3), o in ((compiled, opt), (refs, ref_opt)):
            o.zero_grad(set_to_none=True)
            tmp = m1(data)
            tmp = m2(tmp) if path else m3(tmp)
            loss = torch.abs(tmp.mean() - target)
            loss.backward()
            o.step()
        for m, r in zip(mods, refs):
            for p, q in zip(m.parameters(), r.parameters()):
                torch.testing.assert_close(p, q)


def test_data_dependent_branch_inside_compiled_function(both_flag_settings):
    """The branch reads a device value: Dynamo breaks the graph there; both sides stay right."""
    m1, m2, m3 = nn.Linear(16, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def f(x):
        h = m1(x)
        if h.mean() > 0:
            return m2(h).relu()
        return m3(h).sigmoid()

    compiled = torch.compile(f, backend="hpugraph")
    seen = set()
    with torch.no_grad():
        for i in range(8):
            x = torch.randn(4, 16) + (1.0 if i % 2 else -1.0)
            seen.add(bool(m1(x).mean() > 0))
            torch.testing.assert_close(compiled(x), f(x))
    assert seen == {True, False}


@pytest.mark.parametrize("runs", [3])
def test_item_inside_graph_is_split_as_host_read(dynamic_op_flags, runs):
    lin = nn.Linear(8, 8)

    def f(x):
        h = lin(x)
        scale = h.abs().max().item()
        return (h / scale).tanh(), scale

    compiled = torch.compile(f, backend="hpugraph")
    with torch.no_grad():
        for _ in range(runs):
            x = torch.randn(3, 8)
            out, scale = compiled(x)
            ref_out, ref_scale = f(x)
            torch.testing.assert_close(out, ref_out)
            assert scale == pytest.approx(ref_scale)
    assert "host_read" in {r.reason for r in hpuopt.explain().splits}
