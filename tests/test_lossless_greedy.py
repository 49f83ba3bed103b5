"""Greedy speculative decoding gives exactly the tokens of plain greedy decoding.

Exact equality is the fp32 guarantee: the tiny models are fp32, and the real model's fixture
(`default_model`) loads fp32 explicitly, never `auto`. bf16 is tested in tests/test_numerics.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from specframe import SpeculativeDecoder

from .conftest import tiny_llama

DRAFTER_OPTIONS = {"self_exit": {"layer": 2}, "ngram": {}, "draft_model": None}  # None: filled per test
MODEL_FREE = ("ngram",)


def drafter_options(name, model):
    if name == "draft_model":
        return {"model": tiny_llama(vocab_size=model.config.vocab_size, num_layers=1, seed=7, init=0.3)}
    return DRAFTER_OPTIONS.get(name) or {}


def plain_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         min_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def builtin_pairs(registry):
    drafters = [d for d in registry.names("drafter") if d in ("ngram", "self_exit", "draft_model")]
    return [(d, c) for d in drafters for c in registry.names("controller")]


def test_plain_engine_matches_hf_generate(tiny_model, stub_tokenizer, registry):
    prompt = [5, 9, 2, 33, 5, 9]
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter=None, controller="fixed", registry=registry)
    assert decoder.generate(prompt, max_new_tokens=30).tokens == plain_greedy(tiny_model, prompt, 30)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), prompt=st.lists(st.integers(0, 63), min_size=1, max_size=12),
       k=st.integers(1, 6), max_new=st.integers(1, 24))
def test_every_builtin_pair_is_greedy_lossless(seed, prompt, k, max_new, registry, stub_tokenizer):
    model = tiny_llama(seed=seed % 5, init=0.3)
    expected = plain_greedy(model, prompt, max_new)
    for drafter, controller in builtin_pairs(registry):
        controller_options = {"k": k} if controller in ("fixed", "heuristic") else {}
        decoder = SpeculativeDecoder(
            model, stub_tokenizer, drafter=drafter, controller=controller, registry=registry,
            drafter_options=drafter_options(drafter, model), controller_options=controller_options,
        )
        result = decoder.generate(prompt, max_new_tokens=max_new, seed=seed)
        assert result.tokens == expected, f"{drafter}+{controller} differs from plain greedy"
        assert result.stats.new_tokens == len(expected)


def test_eos_stops_on_every_committed_token(tiny_model, stub_tokenizer, registry):
    """Whatever position EOS lands at inside a verified block, generation stops right there."""
    prompt = [1, 2, 3, 4]
    reference = plain_greedy(tiny_model, prompt, 20)
    for eos_position in (0, 3, 7):
        eos = reference[eos_position]
        expected = reference[: reference.index(eos) + 1]
        tokenizer = type("Tok", (type(stub_tokenizer),), {"eos_token_id": eos})()
        for drafter in ("ngram", "self_exit"):
            decoder = SpeculativeDecoder(tiny_model, tokenizer, drafter=drafter, controller="fixed",
                                         controller_options={"k": 5}, registry=registry,
                                         drafter_options=DRAFTER_OPTIONS[drafter])
            result = decoder.generate(prompt, max_new_tokens=20)
            assert result.tokens == expected and result.finish_reason == "eos"


@pytest.mark.slow
@pytest.mark.parametrize("drafter,controller,options", [
    ("ngram", "heuristic", {}), ("self_exit", "fixed", {"layer": 8}), ("ngram", "fixed", {}),
    ("self_exit", "confidence", {"layer": 6}),
])
def test_default_model_greedy_equality(default_model, drafter, controller, options):
    model, tokenizer = default_model
    assert model.dtype == torch.float32, "token-for-token equality is the fp32 guarantee"
    prompts = ["Explain what a hash table is.", "Write a haiku about the sea.",
               "List three prime numbers and say why they are prime."]
    for prompt in prompts:
        plain = SpeculativeDecoder(model, tokenizer, drafter=None, controller="fixed")
        spec = SpeculativeDecoder(model, tokenizer, drafter=drafter, controller=controller, drafter_options=options)
        expected = plain.generate(prompt, max_new_tokens=40)
        got = spec.generate(prompt, max_new_tokens=40)
        assert got.tokens == expected.tokens, f"{drafter}+{controller} on {prompt!r}"


@pytest.mark.slow
def test_default_model_plain_engine_matches_hf_generate(default_model):
    model, tokenizer = default_model
    decoder = SpeculativeDecoder(model, tokenizer, drafter=None, controller="fixed")
    ids = decoder.encode("Explain what a hash table is.")
    hf = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    assert decoder.generate(ids, max_new_tokens=40).tokens == hf
