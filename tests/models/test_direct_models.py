"""Real model code on ``runtime="direct"`` (pieces called on the caller's tensors, nothing
captured): tiny random transformers configs (no downloads), padded masks, a static-cache
``generate()``, a training step. ATen pieces keep the tests free of compile time; the piece
compilers are tested on their own (tests/runtime/test_direct_runtime.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import hpuopt

transformers = pytest.importorskip("transformers")

VOCAB = 99
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DIRECT = {"runtime": "direct", "piece_compiler": "eager"}


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _batch(gen, batch, seq, left):
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    cut = int(torch.randint(1, seq, (), generator=gen))
    if left:
        mask[0, :cut] = 0
    else:
        mask[0, cut:] = 0
    return ids, mask


def _nothing_captured():
    c = hpuopt.counters
    assert c.graphs_captured == c.static_copies == c.output_clones == 0 and c.replays > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
def test_encoders_with_padded_masks_pad_and_match_eager(make, device):
    gen = torch.Generator().manual_seed(11)
    model = make().eval().to(device)
    compiled = hpuopt.compile(model, **DIRECT)
    tol = dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        for k, (batch, seq) in enumerate([(2, 7), (3, 5), (4, 11), (3, 13), (2, 7)]):
            ids, mask = (t.to(device) for t in _batch(gen, batch, seq, left=k % 2 == 1))
            ref = model(input_ids=ids, attention_mask=mask)[0]
            out = compiled(input_ids=ids, attention_mask=mask)[0]
            real = mask.bool()
            torch.testing.assert_close(out[real], ref[real], **tol)
    _nothing_captured()
    report = compiled.explain()
    assert any("pads" in p.padding for p in report.pieces if p.captured)
    assert "[compiled]" in str(report)


@pytest.mark.parametrize("device", DEVICES)
def test_generate_with_a_static_cache_gives_eagers_tokens(device):
    model = _llama().eval().to(device)
    gen = torch.Generator().manual_seed(12)
    ids, mask = (t.to(device) for t in _batch(gen, 2, 6, left=True))
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        other = copy.deepcopy(model)
        other.forward = torch.compile(other.forward, backend="hpugraph", options=DIRECT)
        out = other.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(out, ref)
    _nothing_captured()


def test_training_steps_match_eager():
    torch.manual_seed(13)
    model = _bert().train()
    for module in model.modules():  # dropout draws differ between eager and compiled runs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph", options=DIRECT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(14)
    for batch, seq in [(2, 7), (3, 5), (2, 7)]:
        ids, mask = _batch(gen, batch, seq, left=False)
        for m, o in ((compiled, opt), (ref, ref_opt)):
            o.zero_grad()
            out = m(input_ids=ids, attention_mask=mask).last_hidden_state
            (out * mask.unsqueeze(-1)).pow(2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    _nothing_captured()
