"""Decoders called without an attention mask: attention is causal (``is_causal=True``), so the
sequence dim pads only if the pad keys' values are finite — a fused kernel multiplies their zero
weights by them, and the runtime fills a float pad it need not zero with NaN. Tiny random
transformers configs (no downloads), through ``hpuopt.compile`` with padding, against eager on
fresh random ids; the logits must hold no NaN and equal eager's."""

from __future__ import annotations

import random

import pytest
import torch

import hpuopt

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64))


def _mixtral_loop():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, experts_implementation="eager"))


@pytest.mark.parametrize("make", [_llama, _mixtral_loop], ids=["llama", "mixtral-loop"])
def test_unmasked_decoder_pads_the_sequence_with_finite_values(make):
    torch.manual_seed(0)
    model = make().eval()
    compiled = hpuopt.compile(model)
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for seq in (7, 5, 6, 3, 7, 11):  # several sizes per bucket: the padded graphs replay
            batch = rng.randint(2, 3)
            ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
            out = compiled(input_ids=ids).logits
            ref = model(input_ids=ids).logits
            assert not out.isnan().any()
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    report = str(compiled.explain())
    assert "pads" in report
