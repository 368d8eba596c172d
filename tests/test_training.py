"""Training through the backend: forward and backward graphs both split and captured."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpuopt


def _mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 5))


def test_forward_and_backward_are_both_captured():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph")
    for _ in range(3):
        x = torch.randn(4, 12)
        compiled(x).square().mean().backward()
    kinds = {a.kind: a for a in hpuopt.explain().graphs[0].aot_graphs}
    assert set(kinds) == {"forward", "backward"}
    for a in kinds.values():
        assert all(p.captured for p in a.pieces)
        assert sum(p.replays for p in a.pieces) == 3


def test_gradient_accumulation_over_several_backwards():
    model = _mlp()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph")
    batches = [torch.randn(4, 12) for _ in range(3)]
    # all forwards first, then all backwards: saved activations of earlier forwards must not be
    # overwritten by later replays
    losses = [compiled(x).square().mean() for x in batches]
    for loss in losses:
        loss.backward()
    for x in batches:
        ref(x).square().mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_grads_are_never_replay_buffers():
    model = _mlp()
    compiled = torch.compile(model, backend="hpugraph")
    x1, x2 = torch.randn(4, 12), torch.randn(4, 12)
    compiled(x1).sum().backward()
    first = {n: p.grad for n, p in model.named_parameters()}
    kept = {n: g.clone() for n, g in first.items()}
    for p in model.parameters():
        p.grad = None
    compiled(x2).sum().backward()  # replays the backward graph again
    for n, g in first.items():
        torch.testing.assert_close(g, kept[n])  # the first step's grads did not change
        assert g.data_ptr() != dict(model.named_parameters())[n].grad.data_ptr()


def test_input_gradients_and_second_input_shape():
    lin = nn.Linear(6, 3)
    compiled = torch.compile(lin, backend="hpugraph")
    for batch in (5, 5, 9):
        x = torch.randn(batch, 6, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        compiled(x).tanh().sum().backward()
        lin.zero_grad()
        lin(xr).tanh().sum().backward()
        torch.testing.assert_close(x.grad, xr.grad)


def test_dropout_fresh_masks_and_same_mask_in_backward():
    p = 0.5
    drop = nn.Dropout(p).train()
    compiled = torch.compile(lambda x: drop(x) * 3.0, backend="hpugraph")
    x0 = torch.rand(64, 16) + 0.5  # strictly positive: a zero output means a dropped element
    masks = []
    for _ in range(4):
        x = x0.clone().requires_grad_()
        y = compiled(x)
        g = torch.randn_like(y)
        y.backward(g)
        mask = y.detach() != 0
        masks.append(mask)
        # the backward used the forward's mask: dx = g * mask * 3 / (1 - p)
        torch.testing.assert_close(x.grad, g * mask * 3.0 / (1 - p))
        kept = mask.float().mean().item()
        assert 0.3 < kept < 0.7
    assert all(not torch.equal(masks[0], m) for m in masks[1:])  # fresh randomness per call


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_training_loop_with_batchnorm_matches_eager(momentum):
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum)
    for batch in (8, 8, 8, 5):
        x, y = torch.randn(batch, 10), torch.randint(0, 3, (batch,))
        for m, o in ((compiled, opt), (ref, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("foreach", [False, True])
def test_compiled_clip_and_adamw_step_matches_eager_and_is_fused(foreach):
    """The step function goes through the backend: the clip and Adam rewrites fire, the fused
    update is captured, and parameters and optimizer state equal eager's after every step."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, foreach=foreach)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05, foreach=foreach)

    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()

    compiled = torch.compile(step, backend="hpugraph")
    for _ in range(6):
        x = torch.randn(5, 8)
        for m in (model, ref):
            m.zero_grad()
            m(x).square().sum().backward()
        compiled()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
    for s, r in zip(opt.state.values(), ref_opt.state.values()):
        torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"])
    report = hpuopt.explain()
    rewrites = {name for g in report.graphs for name in g.rewrites}
    assert {"fused_adam", "fused_clip_norm"} <= rewrites
    assert "rewritten by: fused_adam" in str(report)
    steps = [a for g in report.graphs for a in g.aot_graphs if a.mark_steps]
    assert steps and "before the optimizer step" in steps[0].mark_steps
    # zero_grad reallocates grads: after two moves they are copied, not re-captured each step
    assert hpuopt.counters.recaptures <= 2 * len(report.pieces)
