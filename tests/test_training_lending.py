"""Training without copies: activations saved for backward and gradients are lent, not cloned,
and nothing lent ever changes under its holder.

Every test compares against eager PyTorch on fresh random inputs and keeps references to earlier
outputs and gradients, checking them against clones taken at the time.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import hpuopt
from hpuopt.runtime.lending import CAN_LEND, Lender, lent_storage, plan_loans

needs_lending = pytest.mark.skipif(
    not CAN_LEND, reason="this torch cannot redirect a storage (no UntypedStorage._swap_data_ptr_"
    "): every output is cloned, which the other tests check stays correct")


def _mlp(width: int = 16, blocks: int = 3) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width)]
    return nn.Sequential(*layers, nn.Linear(width, 5))


def _pair(model: nn.Module, **options):
    ref = copy.deepcopy(model)
    return torch.compile(model, backend="hpugraph", options=options or None), ref


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters()]


def _assert_grads(model: nn.Module, ref: nn.Module, **tol) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name, **tol)


class Kept:
    """References to earlier values with clones taken at the time: none may change later."""

    def __init__(self) -> None:
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is not None:
                self.items.append((t, t.detach().clone()))

    def check(self) -> None:
        for t, then in self.items:
            torch.testing.assert_close(t.detach(), then, rtol=0, atol=0)


# -- the mechanism -----------------------------------------------------------------------------


@needs_lending
def test_lender_copies_out_only_what_is_alive():
    buf = torch.randn(6, 4)
    lender = Lender()
    shared: dict = {}
    kept = lender.lend(buf, shared)
    view = lender.lend(buf[2:], shared)  # a second output over the same buffer: one storage
    assert kept.data_ptr() == buf.data_ptr() and lent_storage(view)
    assert view.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr()
    dropped = lender.lend(torch.randn(3), {})
    del dropped
    then = kept.clone()
    assert lender.protect() == 1  # the dead one cost nothing
    buf.fill_(7.0)  # the "replay" overwrites the buffer
    torch.testing.assert_close(kept, then)
    torch.testing.assert_close(view, then[2:])  # still a view of the same values
    view.add_(1.0)
    assert kept[2:].eq(then[2:] + 1).all()  # aliasing between the lent outputs is kept
    assert kept.data_ptr() != buf.data_ptr() and len(lender) == 0


@needs_lending
def test_a_dropped_lender_copies_out_what_is_alive():
    buf = torch.randn(5)
    lender = Lender()
    kept = lender.lend(buf, {})
    then = kept.clone()
    del lender  # the runner (and its graphs) went: the buffer may be freed now
    buf.fill_(0.0)
    torch.testing.assert_close(kept, then)


@needs_lending
def test_planned_loans_hand_out_runs_of_alike_outputs():
    """Buffers alike and evenly spaced go out in one call; each lent tensor has the buffer's
    values and layout, is not a view autograd would detach or refuse to update in place, and
    lives on the one lent storage, copied out whole when one of them is alive."""
    arena = torch.randn(64)
    bufs = [arena[0:8].view(2, 4), arena[16:24].view(2, 4), arena[32:40].view(2, 4),  # a run
            arena[40:48].view(2, 4),  # alike but off the step: a run of its own
            arena[48:54].view(3, 2).t(), arena[56:60]]  # other layouts
    outputs = list(enumerate(bufs))
    plan = plan_loans(outputs)
    (_, _, _, _, by_dtype), = plan
    (_, runs), = by_dtype
    assert sorted(len(members) for members, *_ in runs) == [1, 1, 1, 3]
    lender = Lender()
    outs = list(bufs) + ["not lent"]
    assert lender.lend_planned(plan, outs) == len(bufs)
    assert outs[-1] == "not lent"
    storages = {o.untyped_storage().data_ptr() for o in outs[:-1]}
    for got, buf in zip(outs, bufs):
        assert got is not buf and not got._is_view() and lent_storage(got)
        assert (got.data_ptr(), got.shape, got.stride()) == (buf.data_ptr(), buf.shape,
                                                             buf.stride())
        torch.testing.assert_close(got, buf, rtol=0, atol=0)
    assert len(storages) == 1
    outs[1].add_(1.0)  # autograd accumulating into a lent gradient: allowed, seen in the buffer
    torch.testing.assert_close(bufs[1], outs[1], rtol=0, atol=0)
    kept, then = outs[3], outs[3].clone()
    del outs
    assert lender.protect() == 1  # one of them alive: the whole storage is copied out
    arena.fill_(float("nan"))
    torch.testing.assert_close(kept, then, rtol=0, atol=0)


@needs_lending
def test_saved_activations_and_gradients_are_lent_and_read_in_place():
    model, ref = _pair(_mlp())
    batches = [torch.randn(4, 16) for _ in range(8)]  # all alive: each batch at its own address
    for x in batches[:7]:  # past the captures and the promotions
        for m in (model, ref):
            for p in m.parameters():
                p.grad = None
        model(x).square().mean().backward()
        ref(x).square().mean().backward()
        _assert_grads(model, ref)
    for p in model.parameters():
        p.grad = None
    before = hpuopt.counters.snapshot()
    model(batches[7]).square().mean().backward()
    step = hpuopt.counters.delta(before)
    # one training step copies only what changes per step: the batch into the forward and into
    # the backward (autograd saves the input itself), and the loss gradient (at most: it may be
    # read in place); the saved activations cross without a copy; the only clone is the output
    # the caller receives; nothing lent was alive at a replay
    assert 2 <= step["static_copies"] <= 3, step
    assert step["output_clones"] == 1 and step["lent_copies"] == 0, step
    nparams = len(list(model.parameters()))
    assert step["outputs_lent"] > nparams  # the gradients and the saved activations
    report = hpuopt.explain()
    fw, bw = (a.pieces[0] for a in report.graphs[0].aot_graphs)
    assert fw.outputs_lent > 0 and bw.outputs_lent == bw.calls * nparams
    assert bw.inputs_copied <= 2  # the batch and the loss gradient: activations in place
    text = str(report)
    assert "lent" in text and "cloned" in text


# -- what the user can do between steps ---------------------------------------------------------


@needs_lending
def test_one_gradient_kept_across_steps_keeps_its_value():
    """A graph's outputs share one lent storage: keeping a single gradient keeps it alive, so the
    next backward copies it out first (one copy-out), and the other gradients stay right."""
    model, ref = _pair(_mlp())
    kept = Kept()
    for _ in range(4):
        x = torch.randn(4, 16)
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        _assert_grads(model, ref)
        one = next(model.parameters()).grad
        kept.add(one)
        before = hpuopt.counters.lent_copies
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 16)).square().mean().backward()  # a step while ``one`` is alive
        assert hpuopt.counters.lent_copies == before + 1
        kept.check()
    kept.check()


def test_gradient_accumulation_keeps_earlier_gradients():
    model, ref = _pair(_mlp())
    kept = Kept()
    for step in range(3):
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        before = hpuopt.counters.lent_copies
        for micro in range(3):
            x = torch.randn(4, 16)
            out = model(x)
            kept.add(out)
            out.square().mean().backward()
            ref(x).square().mean().backward()
            _assert_grads(model, ref)  # the sum over the micro-batches so far, as in eager
            if micro == 0:
                first = _grads(model)  # the lent gradients themselves
        # the first micro-batch's gradients were still alive (in .grad) at the next backward:
        # copied out before the replay, then accumulated into by autograd, as eager does
        assert hpuopt.counters.lent_copies > before or not CAN_LEND
        assert all(g is now for g, now in zip(first, _grads(model)))
    kept.check()


def test_two_forwards_before_one_backward():
    model, ref = _pair(_mlp())
    kept = Kept()
    for _ in range(3):
        model.zero_grad(set_to_none=True)  # kept gradients stay as they were
        ref.zero_grad(set_to_none=True)
        xs = [torch.randn(4, 16) for _ in range(2)]
        outs = [model(x) for x in xs]
        refs = [ref(x) for x in xs]
        kept.add(*outs)
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r)
        # backward of the older forward first: its saved activations were copied out when the
        # second forward replayed, not overwritten
        for o, r in zip(outs, refs):
            o.square().mean().backward()
            r.square().mean().backward()
        _assert_grads(model, ref)
        kept.add(*_grads(model))
    kept.check()
    assert hpuopt.counters.lent_copies > 0 or not CAN_LEND


def test_gradients_kept_across_steps_do_not_change():
    """torch.autograd.grad returns the lent gradients to the caller, who keeps them."""
    model, ref = _pair(_mlp())
    kept, history = Kept(), []
    for _ in range(4):
        x = torch.randn(4, 16)
        grads = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
        ref_grads = torch.autograd.grad(ref(x).square().mean(), list(ref.parameters()))
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
        kept.add(*grads)
        history.append((grads, ref_grads))
    kept.check()
    for grads, ref_grads in history:
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)


def test_evaluation_calls_between_training_steps():
    model, ref = _pair(_mlp())
    kept = Kept()
    for _ in range(3):
        x = torch.randn(4, 16)
        out, ref_out = model(x), ref(x)
        kept.add(out)
        model.eval(), ref.eval()
        with torch.no_grad():
            for _ in range(2):
                v = torch.randn(4, 16)
                ev = model(v)
                torch.testing.assert_close(ev, ref(v))
                kept.add(ev)
        # a forward with grad in eval mode too, between the forward and its backward
        v = torch.randn(4, 16)
        torch.testing.assert_close(model(v), ref(v))
        model.train(), ref.train()
        out.square().mean().backward()
        ref_out.square().mean().backward()
        _assert_grads(model, ref)
        kept.add(*_grads(model))
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
    kept.check()


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
        self.b = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=False)
        return self.b(h)


def test_activation_checkpointing_matches_eager():
    model, ref = _pair(_Checkpointed())
    kept = Kept()
    pending = []
    for step in range(4):
        x = torch.randn(3, 16, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        out, ref_out = model(x), ref(xr)
        torch.testing.assert_close(out, ref_out)
        kept.add(out)
        pending.append((out, ref_out, x, xr))
        if step % 2:  # two forwards, then both backwards
            for o, r, xi, xri in pending:
                o.square().sum().backward()
                r.square().sum().backward()
                torch.testing.assert_close(xi.grad, xri.grad)
                kept.add(xi.grad)
            pending.clear()
            _assert_grads(model, ref)
    kept.check()


def test_dropout_without_drop_matches_eager_and_masks_stay_fresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.0), nn.GELU(), nn.Linear(32, 4))
    compiled, ref = _pair(model)
    kept = Kept()
    for _ in range(4):
        x = torch.randn(5, 16)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        compiled(x).square().mean().backward()
        ref(x).square().mean().backward()
        _assert_grads(model, ref)
        kept.add(*_grads(model))
    kept.check()
    # p = 0.5: each step draws a new mask, and the backward of each forward uses its own mask,
    # even when a second forward ran before it
    drop = nn.Dropout(0.5).train()
    fn = torch.compile(lambda t: drop(t) * 2.0, backend="hpugraph")
    base = torch.rand(64, 16) + 0.5  # strictly positive: zero means dropped
    masks = []
    for _ in range(3):
        xs = [base.clone().requires_grad_() for _ in range(2)]
        ys = [fn(x) for x in xs]
        for x, y in zip(xs, ys):
            g = torch.randn_like(y)
            y.backward(g)
            mask = y.detach() != 0
            torch.testing.assert_close(x.grad, g * mask * 2.0 / 0.5)
            masks.append(mask)
    assert all(not torch.equal(masks[0], m) for m in masks[1:])
    assert 0.35 < torch.stack(masks).float().mean().item() < 0.65


def test_training_loop_with_optimizer_matches_eager():
    model = _mlp(width=24, blocks=4)
    compiled, ref = _pair(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    kept = Kept()
    for _ in range(5):
        x, y = torch.randn(6, 24), torch.randint(0, 5, (6,))
        for m, o in ((compiled, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            if m is compiled:
                kept.add(loss)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    kept.check()


def test_clone_outputs_false_still_marks_stale_not_copies():
    """Alias mode keeps its contract: every escaping output is lent without liveness."""
    lin = nn.Linear(8, 8)
    compiled = torch.compile(lin, backend="hpugraph", options={"clone_outputs": False})
    with torch.no_grad():
        compiled(torch.randn(2, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            before = hpuopt.counters.snapshot()
            first = compiled(torch.randn(2, 8))
            compiled(torch.randn(2, 8))
    delta = hpuopt.counters.delta(before)
    assert delta["lent_copies"] == 0 and delta["stale_outputs"] >= 1
    del first


# -- a real model -------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _tiny(kind: str) -> nn.Module:
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=37,
                                      max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_tiny_transformer_training_loop_matches_eager(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        model = _tiny(kind).train()
        compiled, ref = _pair(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
        kept = Kept()
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            ids = torch.randint(3, 99, (2, 9), generator=gen)
            labels = (torch.randint(0, 2, (2,), generator=gen) if kind == "bert" else ids)
            losses = []
            for m, o in ((compiled, opt), (ref, ref_opt)):
                o.zero_grad()
                loss = m(input_ids=ids, labels=labels).loss
                loss.backward()
                losses.append(loss)
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
            _assert_grads(model, ref, rtol=1e-3, atol=1e-5)
            kept.add(losses[0], *[p.grad for p in model.parameters() if p.grad is not None][:8])
            opt.step()
            ref_opt.step()
    kept.check()
    assert hpuopt.counters.outputs_lent > 0 or not CAN_LEND
