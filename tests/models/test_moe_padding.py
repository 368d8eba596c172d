"""Routed experts on real model code: a tiny random Mixtral (no downloads) called with random
(batch, sequence) through ``hpuopt.compile``, its logits equal to eager's. With experts run per
(token, expert) pair (``experts_implementation="batched_mm"``) and with transformers' default
experts (grouped matmuls over the pairs sorted by expert: ``sort``, ``histc``, the grouped matmul,
the inverse permutation) the whole decoder is one static piece, padded on batch and sequence, its
graphs bounded by the power-of-two bucket combinations of the shapes seen."""

from __future__ import annotations

import warnings

import pytest
import torch

import hpuopt

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _run(**experts: str) -> tuple[list, set[tuple[int, int]]]:
    """Ten calls of random (batch 2..6, sequence 3..19), each checked against eager; the
    captured pieces and the power-of-two bucket combinations the calls fall in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64, **experts)).eval()
        compiled = hpuopt.compile(model)
        gen = torch.Generator().manual_seed(1)
        seen = set()
        with torch.no_grad():
            for _ in range(10):
                batch, seq = (int(torch.randint(lo, hi, (), generator=gen))
                              for lo, hi in ((2, 7), (3, 20)))
                seen.add((_pow2(batch), _pow2(seq)))
                ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
                out = compiled(input_ids=ids).logits
                torch.testing.assert_close(out, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    return [p for p in compiled.explain().pieces if p.captured and p.graphs], seen


def test_batched_experts_pad_batch_and_sequence():
    pieces, seen = _run(experts_implementation="batched_mm")
    if _version(transformers.__version__) < (5, 24):
        # older releases build the router and the mask differently (a mask input, ids through
        # other ops): the piece runs at exact shapes there, with its reasons; results still equal
        assert any(p.padding.startswith("exact shapes") for p in pieces)
        return
    assert max(len(p.graphs) for p in pieces) <= len(seen)
    assert any("dim 0" in p.padding and "dim 1" in p.padding for p in pieces)


def test_grouped_experts_pad_batch_and_sequence():
    """transformers' default experts: the pairs sorted by expert, ``histc`` with a fixed range
    (captured), grouped matmuls over its offsets, the pairs' order restored by the inverse
    permutation. One piece, padded like the batched experts."""
    pieces, seen = _run()
    text = " ".join(p.padding for p in pieces)
    for op in ("sort", "histc", "grouped_mm", "arange", "index_put"):
        assert op not in text, text  # the experts never keep a dim exact
    if _version(transformers.__version__) < (5, 24):
        # older releases pass an attention mask that the analysis does not prove masks every
        # pad key: the sequence runs at exact sizes there, with that reason; the batch pads
        assert any("dim 0" in p.padding for p in pieces)
        return
    assert max(len(p.graphs) for p in pieces) <= len(seen)
    assert any("dim 0" in p.padding and "dim 1" in p.padding for p in pieces)
