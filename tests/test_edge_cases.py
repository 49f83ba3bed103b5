"""Numerical and boundary edge cases: masked distributions, temperatures near 0, p == q, EOS and the
length limit at every position of a verified block, max_new_tokens=1."""

from __future__ import annotations

import types

import pytest
import torch
from attrs import define, field

from specframe import SpeculativeDecoder, hookimpl
from specframe.engine import _commit
from specframe.interfaces import Drafter
from specframe.plugins import PluginRegistry
from specframe.sampling import Sampler, probs_from_logits
from specframe.types import Draft, SamplingConfig
from specframe.verifiers.speculative import residual_distribution, speculative_step

PROMPT = [1, 2, 3, 4]
MAX_NEW = 24
V = 64


@define
class ScriptDrafter(Drafter):
    """Drafts `script[position]` for each position of the new text (the plain greedy continuation,
    or anything else), with `swap` replacing the token at chosen positions."""

    script: list = field(factory=list)
    prompt: list = field(factory=list)
    swap: dict = field(factory=dict)  # position -> token drafted there instead
    began: int = field(default=0, init=False)
    firsts: list = field(factory=list, init=False)  # the position of the first draft of each round

    def begin(self, target, prompt_ids, sampler) -> None:
        self.began += 1

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        start = len(context) - len(self.prompt)
        self.firsts.append(start)
        tokens = [self.swap.get(i, t) for i, t in enumerate(self.script) if start <= i < start + max_tokens]
        return Draft(torch.tensor(tokens, dtype=torch.long), None, (1.0,) * len(tokens))


def _plugin():
    module = types.ModuleType("edge_parts")
    module.register_drafters = hookimpl(lambda register: register("script", ScriptDrafter))
    return module


@pytest.fixture(scope="module")
def edge_registry():
    return PluginRegistry(autoload=False, extra_plugins=[_plugin()])


@pytest.fixture(scope="module")
def reference(tiny_model):
    out = tiny_model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_NEW, do_sample=False, min_new_tokens=MAX_NEW)
    return out[0, len(PROMPT):].tolist()


def _tokenizer(stub_tokenizer, eos):
    return type("EosTokenizer", (type(stub_tokenizer),), {"eos_token_id": eos})()


def _scripted(model, tokenizer, registry, script, k=3, swap=None):
    return SpeculativeDecoder(model, tokenizer, drafter="script", controller="fixed", controller_options={"k": k},
                              drafter_options={"script": script, "prompt": PROMPT, "swap": swap or {}},
                              registry=registry)


# ---- masked distributions and temperatures near 0 ---------------------------------------------
@pytest.mark.parametrize("sampling", [
    dict(temperature=1.0, top_k=1), dict(temperature=0.7, top_p=1e-9), dict(temperature=1.5, top_k=1, top_p=0.5),
    dict(temperature=1e-6), dict(temperature=1e-6, top_k=3),
], ids=["top_k=1", "tiny top_p", "top_k=1 and top_p", "temperature 1e-6", "temperature 1e-6 top_k=3"])
@pytest.mark.parametrize("drafter", ["self_exit", "ngram", None])
def test_all_but_one_token_masked_samples_the_greedy_tokens(tiny_model, stub_tokenizer, registry, reference,
                                                             sampling, drafter):
    """When top-k/top-p (or a temperature near 0) leave one token, sampling is greedy decoding:
    speculative sampling must then accept and correct exactly like the greedy verifier."""
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter=drafter, controller="fixed",
                                 drafter_options={"layer": 2} if drafter == "self_exit" else None, registry=registry)
    for seed in (0, 1):
        result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW, seed=seed, **sampling)
        assert result.tokens == reference


@pytest.mark.parametrize("config", [
    SamplingConfig(1e-6), SamplingConfig(1e-6, top_k=1), SamplingConfig(1e-6, top_p=0.3), SamplingConfig(1.0, top_k=1),
    SamplingConfig(1.0, top_p=1e-12), SamplingConfig(1e4), SamplingConfig(1.0, top_k=10**9),
    # tiny but positive temperatures (allowed when SamplingConfig is built directly): logits / T
    # overflowed to inf (NaN probabilities) from ~1e-37, and T rounded to 0 in float32 below ~1e-45
    SamplingConfig(1e-37), SamplingConfig(1e-40), SamplingConfig(1e-46, top_k=3), SamplingConfig(5e-324, top_p=0.5),
])
def test_processed_distributions_stay_finite(config):
    generator = torch.Generator().manual_seed(0)
    logits = torch.cat([30 * torch.randn(4, V, generator=generator),
                        torch.full((1, V), 7.0),  # all tied
                        torch.full((1, V), float("-inf")).index_fill(1, torch.tensor([5]), 0.0)])  # one possible
    probs = probs_from_logits(logits, config)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(len(logits)), atol=1e-5)
    assert probs[-1, 5] == 1.0
    sampler = Sampler(config)
    for row in probs:
        assert row[sampler.sample(row)] > 0
    if config.temperature <= 1e-6 or config.top_k == 1:
        assert (probs[:4].argmax(-1) == logits[:4].argmax(-1)).all()
        assert (probs[:4].max(-1).values > 0.999).all()


# ---- p == q -----------------------------------------------------------------------------------
def test_zero_residual_mass_falls_back_to_p():
    p = torch.softmax(torch.randn(3, V, generator=torch.Generator().manual_seed(1)), -1)
    assert torch.equal(residual_distribution(p[0], p[0]), p[0])
    assert torch.isfinite(residual_distribution(p[0], p[0] + 1e-9)).all()
    drafts = torch.tensor([int(p[0].argmax()), int(p[1].argmax())])
    # p == q accepts with probability 1; a uniform of 1.0 forces the rejection branch anyway
    verdict = speculative_step(drafts, p[:2], p, [1.0, 1.0], lambda dist: int(dist.argmax()))
    assert verdict.accepted_length == 0 and verdict.next_token == int(p[0].argmax())
    verdict = speculative_step(drafts, p[:2], p, [0.999999, 0.999999], lambda dist: int(dist.argmax()))
    assert verdict.accepted_length == 2
    one_hot = torch.nn.functional.one_hot(drafts, V).float()  # p == q == one-hot (top_k=1)
    p_one_hot = torch.cat([one_hot, one_hot[:1]])
    verdict = speculative_step(drafts, one_hot, p_one_hot, [1.0, 1.0], lambda dist: int(torch.multinomial(dist, 1)))
    assert verdict.accepted_length == 0 and verdict.next_token == int(drafts[0])


def test_the_target_as_its_own_drafter(tiny_model, stub_tokenizer, registry):
    """q equals p (up to float error): nearly every draft is accepted, nothing breaks, and greedy
    output is plain decoding's."""
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="draft_model", controller="fixed",
                                 drafter_options={"model": tiny_model}, registry=registry)
    result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW, temperature=1.0, seed=0)
    assert result.stats.acceptance_rate > 0.9 and len(result.tokens) == MAX_NEW
    plain = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="none", registry=registry)
    assert decoder.generate(PROMPT, max_new_tokens=MAX_NEW).tokens == plain.generate(PROMPT, max_new_tokens=MAX_NEW).tokens


# ---- EOS and the length limit inside a block -------------------------------------------------
def _first_unique(reference, candidates):
    """A position whose token does not occur earlier in the reference (so EOS there stops there)."""
    for position in candidates:
        if reference[position] not in reference[:position]:
            return position
    pytest.skip("no usable position in this reference")


def test_eos_as_the_first_draft_token_of_a_round(tiny_model, stub_tokenizer, edge_registry, reference):
    probe = _scripted(tiny_model, stub_tokenizer, edge_registry, reference)
    probe.generate(PROMPT, max_new_tokens=MAX_NEW)
    firsts = probe.parts.drafter.firsts  # 1, 5, 9, ... with every draft accepted
    position = _first_unique(reference, firsts[1:])
    decoder = _scripted(tiny_model, _tokenizer(stub_tokenizer, reference[position]), edge_registry, reference)
    result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert result.tokens == reference[: position + 1] and result.finish_reason == "eos"
    assert decoder.parts.drafter.firsts[-1] == position  # EOS was the first draft of the last round


def test_eos_drafted_first_but_rejected(tiny_model, stub_tokenizer, edge_registry, reference):
    eos = next(t for t in range(V) if t not in reference)
    decoder = _scripted(tiny_model, _tokenizer(stub_tokenizer, eos), edge_registry, reference, swap={5: eos, 1: eos})
    result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert result.tokens == reference and result.finish_reason == "length"


def test_eos_accepted_mid_block(tiny_model, stub_tokenizer, edge_registry, reference):
    position = _first_unique(reference, [6, 10, 14, 7, 11])  # the middle of a 3-token block
    decoder = _scripted(tiny_model, _tokenizer(stub_tokenizer, reference[position]), edge_registry, reference)
    result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert result.tokens == reference[: position + 1] and result.finish_reason == "eos"
    assert result.stats.new_tokens == position + 1
    assert position + 1 < decoder.parts.drafter.firsts[-1] + 3  # drafts after EOS were dropped


def test_eos_as_the_bonus_token(tiny_model, stub_tokenizer, edge_registry, reference):
    position = _first_unique(reference, [4, 8, 12, 16])  # k=3: positions 4, 8, ... are bonus tokens
    decoder = _scripted(tiny_model, _tokenizer(stub_tokenizer, reference[position]), edge_registry, reference)
    result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert result.tokens == reference[: position + 1] and result.finish_reason == "eos"


@pytest.mark.parametrize("max_new", [2, 3, 5, 6, 7, 9, 11])
@pytest.mark.parametrize("k", [3, 8])
def test_max_length_reached_mid_block(tiny_model, stub_tokenizer, edge_registry, reference, max_new, k):
    decoder = _scripted(tiny_model, stub_tokenizer, edge_registry, reference, k=k)
    result = decoder.generate(PROMPT, max_new_tokens=max_new)
    assert result.tokens == reference[:max_new] and result.finish_reason == "length"
    assert result.stats.new_tokens == max_new


def test_eos_on_the_last_allowed_token_is_eos(tiny_model, stub_tokenizer, edge_registry, reference):
    position = _first_unique(reference, range(3, MAX_NEW))
    decoder = _scripted(tiny_model, _tokenizer(stub_tokenizer, reference[position]), edge_registry, reference, k=8)
    result = decoder.generate(PROMPT, max_new_tokens=position + 1)
    assert result.tokens == reference[: position + 1] and result.finish_reason == "eos"


def test_commit_cuts_at_eos_and_at_the_limit():
    assert _commit([5, 6, 7, 8], {7}, 10) == ([5, 6, 7], "eos")
    assert _commit([5, 6, 7, 8], set(), 2) == ([5, 6], "length")
    assert _commit([5, 6, 7, 8], {6}, 2) == ([5, 6], "eos")
    assert _commit([5, 6], set(), 3) == ([5, 6], None)
    assert _commit([7], {7}, 1) == ([7], "eos")


@pytest.mark.parametrize("drafter", [None, "ngram", "self_exit", "script"])
def test_max_new_tokens_1(tiny_model, stub_tokenizer, edge_registry, reference, drafter):
    options = {"self_exit": {"layer": 2}, "script": {"script": reference, "prompt": PROMPT}}.get(drafter)
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter=drafter, controller="fixed",
                                 drafter_options=options, registry=edge_registry)
    for sampling in (dict(), dict(temperature=0.8, seed=1)):
        result = decoder.generate(PROMPT, max_new_tokens=1, **sampling)
        assert len(result.tokens) == 1 and result.stats.rounds == 0 and result.finish_reason == "length"
    assert decoder.generate(PROMPT, max_new_tokens=1).tokens == reference[:1]
    if drafter == "script":
        assert decoder.parts.drafter.began == 0  # no round, so the drafter was not even started


def test_eos_as_the_very_first_token(tiny_model, stub_tokenizer, edge_registry, reference):
    decoder = _scripted(tiny_model, _tokenizer(stub_tokenizer, reference[0]), edge_registry, reference)
    result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert result.tokens == reference[:1] and result.finish_reason == "eos" and result.stats.rounds == 0
