"""transformers models with ``attn_implementation="eager"`` (tiny random configs, no downloads)
through ``hpuopt.compile``: their attention is ``softmax(q @ k^T * scale + mask) @ v`` with a
``torch.finfo(dtype).min`` additive mask. The real positions equal eager's, and the sequence pads
to buckets whenever every real query row keeps an unmasked key; a call with a fully masked row
(left padding under a causal mask) runs exact and explain says why."""

from __future__ import annotations

import pytest
import torch

import hpuopt

transformers = pytest.importorskip("transformers")

VOCAB = 99


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=37, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval().model


def _batch(gen, batch, seq, side):
    """Random ids and a padding mask whose rows each keep at least one real token."""
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        cut = int(torch.randint(0, seq, (), generator=gen))
        if side == "right":
            mask[row, seq - cut:] = 0
        else:
            mask[row, :cut] = 0
    return ids, mask


def _pow2(n):
    return 1 << (n - 1).bit_length()


def _run(model, compiled, gen, shapes, side):
    """Each (batch, seq) through both; the real positions must match. Returns the buckets."""
    seen = set()
    with torch.no_grad():
        for batch, seq in shapes:
            seen.add((_pow2(batch), _pow2(seq)))
            ids, mask = _batch(gen, batch, seq, side)
            ref = model(input_ids=ids, attention_mask=mask)[0]
            out = compiled(input_ids=ids, attention_mask=mask)[0]
            real = mask.bool()
            torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)
    return seen


def _shapes(gen, n):
    return [tuple(int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 7), (3, 25)))
            for _ in range(n)]


def _padded_pieces(compiled):
    return [p for p in compiled.explain().pieces if p.captured and "pads" in p.padding]


@pytest.mark.parametrize(("make", "side"), [(_bert, "right"), (_bert, "left"), (_llama, "right")],
                         ids=["bert-right", "bert-left", "llama-right"])
def test_eager_attention_pads_the_sequence_when_every_real_row_keeps_a_key(make, side):
    """BERT's bidirectional mask keeps every row a real key either side; Llama's causal mask
    does with right padding (left padding fully masks the pad tokens' rows: next test). Batch
    and sequence pad, within the bucket combinations seen."""
    gen = torch.Generator().manual_seed(11)
    model = make()
    compiled = hpuopt.compile(model)
    seen = _run(model, compiled, gen, _shapes(gen, 10), side)
    pieces = _padded_pieces(compiled)
    assert any("dim 1" in p.padding for p in pieces), [p.padding for p in pieces]
    assert max(len(p.graphs) for p in compiled.explain().pieces if p.captured) <= len(seen)
    assert all("ran exact" not in p.padding for p in pieces)
    assert hpuopt.counters.fallbacks == 0


def test_a_fully_masked_real_row_runs_exact_and_explain_says_why():
    """Llama, left padding: a pad token's query row sees only earlier pad tokens, all masked
    by finfo.min, so eager gives it a uniform softmax over the keys — which padding the keys
    would change. Such calls run exact (and still match eager everywhere); a right-padded call
    after them pads again."""
    gen = torch.Generator().manual_seed(12)
    model = _llama()
    compiled = hpuopt.compile(model)
    with torch.no_grad():
        for batch, seq in [(2, 7), (3, 5), (2, 11)]:
            ids, mask = _batch(gen, batch, seq, "left")
            mask[0, :2] = 0  # at least one fully masked row per call
            ref = model(input_ids=ids, attention_mask=mask)[0]
            torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask)[0], ref,
                                       rtol=1e-4, atol=1e-4)
    pieces = _padded_pieces(compiled)
    assert any("ran exact" in p.padding and "masks every key of a real query row" in p.padding
               for p in pieces), [p.padding for p in compiled.explain().pieces]
    before = [(p.padding, len(p.graphs)) for p in compiled.explain().pieces if p.captured]
    _run(model, compiled, gen, [(2, 9), (2, 13)], "right")  # both in bucket (2, 16)
    after = [(p.padding, len(p.graphs)) for p in compiled.explain().pieces if p.captured]
    assert [text for text, _ in after] == [text for text, _ in before]  # no more exact calls
    assert all(n - m <= 1 for (_, n), (_, m) in zip(after, before))  # one graph: the bucket
