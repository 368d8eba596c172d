"""Copied inputs whose address never changes are read in place
(``hpuopt.runtime.address_policy``).


The cases: an input passed at the same address every call (promoted after the watch window,
captured once more, then read with no copy), one that moves after promotion (demoted for good,
results still right), inputs that move every call (never promoted), and an input the piece
writes to (written in place once promoted). Every call is checked against eager.
"""

from __future__ import annotations

import torch

import hpuopt
from hpuopt.diagnostics.explain import PieceReport
from hpuopt.runtime.address_policy import _SAME_BEFORE_STABLE


def _captured() -> list[PieceReport]:
    return [p for p in hpuopt.explain().pieces if p.captured]


def _f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w) * 2 + x.sum()


def test_input_at_a_fixed_address_is_promoted_and_read_in_place():
    compiled = torch.compile(_f, backend="hpugraph")
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    watch = _SAME_BEFORE_STABLE + 1
    for _ in range(watch):
        x.copy_(torch.randn(4, 8))  # new contents, same storage: what a reused buffer sees
        torch.testing.assert_close(compiled(x, w), _f(x, w))
    with hpuopt.counters.expect(promotions=0, graphs_captured=0, replays=5):
        for _ in range(5):
            x.copy_(torch.randn(4, 8))
            w.copy_(torch.randn(8, 8))
            torch.testing.assert_close(compiled(x, w), _f(x, w))
    assert hpuopt.counters.promotions == 1
    (piece,) = _captured()
    assert (piece.inputs_copied, piece.inputs_in_place) == (0, 2)  # both read in place
    assert "2 read in place, 0 copied per call" in str(hpuopt.explain())


def test_promoted_input_that_moves_is_copied_again_for_good():
    compiled = torch.compile(_f, backend="hpugraph")
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    for _ in range(_SAME_BEFORE_STABLE + 2):
        torch.testing.assert_close(compiled(x, w), _f(x, w))
    assert hpuopt.counters.promotions == 1
    # from now on x is a fresh tensor every call: one recapture, then x is copied
    with hpuopt.counters.expect(recaptures=1, promotions=0):
        for _ in range(6):
            x = torch.randn(4, 8)
            torch.testing.assert_close(compiled(x, w), _f(x, w))
    (piece,) = _captured()
    assert (piece.inputs_copied, piece.inputs_in_place) == (1, 1)
    with hpuopt.counters.expect(recaptures=0, graphs_captured=0):
        for _ in range(3):
            x = torch.randn(4, 8)
            torch.testing.assert_close(compiled(x, w), _f(x, w))


def test_inputs_that_move_every_call_are_never_promoted():
    compiled = torch.compile(_f, backend="hpugraph")
    kept = []  # keep every input alive, so no address can repeat
    with hpuopt.counters.expect(promotions=0, graphs_captured=1, recaptures=0):
        for _ in range(8):
            x, w = torch.randn(4, 8), torch.randn(8, 8)
            kept.append((x, w))
            torch.testing.assert_close(compiled(x, w), _f(x, w))


def _accumulate(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    state.mul_(0.5).add_(x)
    return state.sum()


def test_promoted_mutated_input_is_written_in_place():
    compiled = torch.compile(_accumulate, backend="hpugraph")
    state = torch.randn(16)
    ref_state = state.clone()
    kept = []
    for _ in range(_SAME_BEFORE_STABLE + 6):
        x = torch.randn(16)
        kept.append(x)
        out = compiled(state, x)
        expected = _accumulate(ref_state, x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(state, ref_state)
    assert hpuopt.counters.promotions == 1
    (piece,) = _captured()
    assert piece.inputs_in_place == 1  # the state is written where the caller keeps it


def test_optimizer_gradients_are_read_in_place():
    """torch does not mark gradients static; the step's pieces read them in place anyway."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 17, 33)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt, ref_opt = torch.optim.Adam(params, lr=0.01), torch.optim.Adam(ref, lr=0.01)

    @torch.compile(backend="hpugraph")
    def step():
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        hpuopt.optim.step(opt)

    for p in params:
        p.grad = torch.zeros_like(p)
    for _ in range(_SAME_BEFORE_STABLE + 4):
        grads = [torch.randn_like(p) for p in params]
        for p, r, g in zip(params, ref, grads):
            p.grad.copy_(g)
            r.grad = g.clone()
        step()
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        ref_opt.step()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r)
            torch.testing.assert_close(p.grad, r.grad)  # the clipped gradients, written in place
    assert all(p.inputs_copied == 0 for p in _captured())
