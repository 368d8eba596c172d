"""Real model code: tiny random Hugging Face configs (no downloads) through the backend, against
eager on the real positions. Variable batch and sequence, padded masks (left and right),
``generate()`` with a static cache (plain and wrapped), a training step on an encoder. Each test
runs on the CPU and, where there is a GPU, on CUDA (``-m cuda`` selects those)."""

from __future__ import annotations

import copy

import pytest
import torch

import hpuopt

transformers = pytest.importorskip("transformers")

VOCAB = 99
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
SHAPES = [(2, 7), (3, 5), (2, 7), (4, 11)]  # (batch, sequence); a repeat replays


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=64)
    return transformers.BertModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=37, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=48, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(cfg)


def _batch(gen, batch, seq, side):
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    cut = int(torch.randint(1, seq, (), generator=gen))
    if side == "right":
        mask[0, cut:] = 0
    else:
        mask[0, :cut] = 0
    return ids, mask


def _tol(device):
    """A padded bucket runs other kernels than eager's shape; GPU kernels round differently."""
    return {"rtol": 1e-4, "atol": 1e-4} if device == "cpu" else {"rtol": 1e-3, "atol": 1e-3}


def _assert_real_positions_equal(ref, out, mask):
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], **_tol(out.device.type))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [_bert, _llama, _gpt2], ids=["bert", "llama", "gpt2"])
def test_encoders_and_decoders_with_padded_masks_match_eager(make, device):
    gen = torch.Generator().manual_seed(3)
    model = make().eval().to(device)
    compiled = torch.compile(model, backend="hpugraph")
    with torch.no_grad():
        for (batch, seq), side in zip(SHAPES, ("right", "left", "left", "right")):
            ids, mask = (t.to(device) for t in _batch(gen, batch, seq, side))
            ref = model(input_ids=ids, attention_mask=mask)[0]
            _assert_real_positions_equal(ref, compiled(input_ids=ids, attention_mask=mask)[0], mask)
    assert hpuopt.counters.replays > 0 and hpuopt.counters.fallbacks == 0


@pytest.mark.parametrize("device", DEVICES)
def test_t5_encoder_decoder_matches_eager(device):
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                num_heads=4, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval().to(device)
    compiled = torch.compile(model, backend="hpugraph")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for batch, seq in SHAPES[:3]:
            ids = torch.randint(1, VOCAB, (batch, seq), generator=gen).to(device)
            dec = torch.randint(1, VOCAB, (batch, 4), generator=gen).to(device)
            ref = model(input_ids=ids, decoder_input_ids=dec).logits
            torch.testing.assert_close(compiled(input_ids=ids, decoder_input_ids=dec).logits, ref,
                                       **_tol(device))


@pytest.mark.parametrize("device", DEVICES)
def test_mixtral_routed_experts_match_eager(device):
    model = _mixtral().eval().to(device)
    compiled = hpuopt.compile(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for batch, seq in SHAPES:
            ids = torch.randint(1, VOCAB, (batch, seq), generator=gen).to(device)
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits,
                                       **_tol(device))
    pieces = compiled.explain().pieces
    # the router counts tokens per expert with histc over a fixed range: captured with the rest
    assert any(p.captured and "aten.histc.default" in p.ops for p in pieces)
    assert not any(r.op == "aten.histc.default" for p in pieces for r in p.reasons)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["compiled forward", "wrap_in_hpu_graph"])
def test_generate_with_a_static_cache_gives_eagers_tokens(how, device):
    model = _llama().eval().to(device)
    gen = torch.Generator().manual_seed(6)
    ids, mask = (t.to(device) for t in _batch(gen, 2, 6, "left"))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static"}
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        other = copy.deepcopy(model)
        if how == "wrap_in_hpu_graph":
            hpuopt.wrap_in_hpu_graph(other)
        else:
            other.forward = torch.compile(other.forward, backend="hpugraph")
        out = other.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(out, ref)
    assert hpuopt.counters.replays > 0


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_on_an_encoder_match_eager(device):
    torch.manual_seed(7)
    model = _bert().train().to(device)
    for module in model.modules():  # dropout draws differ between eager and compiled runs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hpugraph")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(8)
    for batch, seq in SHAPES[:3]:
        ids, mask = (t.to(device) for t in _batch(gen, batch, seq, "right"))
        for m, o in ((compiled, opt), (ref, ref_opt)):
            o.zero_grad()
            out = m(input_ids=ids, attention_mask=mask).last_hidden_state
            (out * mask.unsqueeze(-1)).pow(2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **(_tol(device) if device != "cpu" else
                                            {"rtol": 1e-4, "atol": 1e-5}))


def _pow2(n):
    return 1 << (n - 1).bit_length()


def _graphs_per_piece(compiled):
    return max(len(p.graphs) for p in compiled.explain().pieces if p.captured)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
def test_encoders_pad_batch_and_sequence_to_buckets(make, device):
    """Random (batch 1..8, sequence 3..30) with padded masks: no piece holds more graphs than
    the power-of-two bucket combinations of the shapes seen, and the real positions equal
    eager's."""
    gen = torch.Generator().manual_seed(9)
    model = make().eval().to(device)
    model = getattr(model, "model", getattr(model, "bert", model))  # the encoder itself
    compiled = hpuopt.compile(model)
    seen = set()
    with torch.no_grad():
        for k in range(14):
            batch, seq = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 9), (3, 31)))
            seen.add((_pow2(batch), _pow2(seq)))
            ids, mask = (t.to(device) for t in _batch(gen, batch, seq, ("left", "right")[k % 2]))
            ref = model(input_ids=ids, attention_mask=mask)[0]
            _assert_real_positions_equal(ref, compiled(input_ids=ids, attention_mask=mask)[0], mask)
    # CUDA's memory-efficient attention pads the bias to a multiple of 16 and slices it back:
    # proven the identity (tests/passes/padding/test_padding_aligned_bias.py), so 2-D there too
    assert _graphs_per_piece(compiled) <= len(seen)
    assert any("pads" in p.padding and "dim 1" in p.padding for p in compiled.explain().pieces)


def test_a_bucket_past_the_position_table_runs_exact_and_says_why():
    """BERT reads position ids from a buffer cut to the padded length: a bucket longer than
    the buffer (sequence 35 -> 64 > 40 positions) fails the per-bucket check and runs at the
    exact size, with the reason in explain."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=40)
    model = transformers.BertModel(cfg).eval()
    compiled = hpuopt.compile(model)
    gen = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for batch, seq in [(2, 5), (3, 7), (2, 35), (3, 36)]:
            ids, mask = _batch(gen, batch, seq, "right")
            ref = model(input_ids=ids, attention_mask=mask)[0]
            _assert_real_positions_equal(ref, compiled(input_ids=ids, attention_mask=mask)[0], mask)
    assert hpuopt.counters.fallbacks == 0
    assert any("ran exact" in p.padding and "checked values" in p.padding
               for p in compiled.explain().pieces)
