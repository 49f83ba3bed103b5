"""Sampled speculative decoding follows exactly the target's distribution.

A tiny Llama with a 4-token vocabulary: the exact distribution of its 3-token continuations is
computed by enumeration (64 sequences). Many seeded generations through the engine must match
it (chi-square test); the same test rejects a deliberately broken verifier.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from attrs import define

from specframe import Draft, SpeculativeDecoder, Verdict, hookimpl
from specframe.interfaces import Drafter, Verifier
from specframe.plugins import PluginRegistry
from specframe.sampling import probs_from_logits
from specframe.types import SamplingConfig

from .conftest import tiny_llama

V, LENGTH, PROMPT, SAMPLES = 4, 3, [1, 2, 3], 1500


@define
class SkewedDrafter(Drafter):
    """Samples from a fixed distribution far from the target's, so rejections are frequent."""

    def propose(self, context, max_tokens, controller, sampler):
        q_row = sampler.probs(torch.tensor([[2.0, -1.0, 0.5, 0.0]]))[0]
        tokens, rows = [], []
        while len(tokens) < max_tokens:
            tokens.append(sampler.sample(q_row))
            rows.append(q_row)
            if not controller.keep_drafting(len(tokens), float(q_row.max())):
                break
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.stack(rows), (float(q_row.max()),) * len(tokens))


@define
class AlwaysAcceptVerifier(Verifier):
    """Broken on purpose: keeps every draft, so the output follows q, not p."""

    def verify(self, draft_tokens, q, p, sampler):
        K = draft_tokens.shape[0]
        return Verdict(K, sampler.sample(p[K]))


class TestPlugin:
    @staticmethod
    @hookimpl
    def register_drafters(register):
        register("skewed", SkewedDrafter)

    @staticmethod
    @hookimpl
    def register_verifiers(register):
        register("always_accept", AlwaysAcceptVerifier)


@pytest.fixture(scope="module")
def toy():
    return tiny_llama(vocab_size=V, num_layers=2, hidden_size=16, seed=3, init=0.6)


@pytest.fixture(scope="module")
def toy_registry():
    return PluginRegistry(autoload=False, extra_plugins=[TestPlugin])


def exact_distribution(model, config: SamplingConfig) -> dict[tuple, float]:
    dist = {}
    with torch.inference_mode():
        for seq in itertools.product(range(V), repeat=LENGTH):
            logits = model(torch.tensor([PROMPT + list(seq[:-1])])).logits[0, len(PROMPT) - 1 :]
            probs = probs_from_logits(logits, config)
            dist[seq] = float(torch.prod(probs[torch.arange(LENGTH), torch.tensor(seq)]))
    return dist


def chi_square_p_value(counts: dict, expected: dict, n: int) -> float:
    """Pearson's test, merging cells with expected count < 5 into one."""
    stat, small_obs, small_exp, cells = 0.0, 0, 0.0, 0
    for seq, prob in expected.items():
        e, o = prob * n, counts.get(seq, 0)
        if e < 5:
            small_obs, small_exp = small_obs + o, small_exp + e
            continue
        stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if small_exp > 0:
        stat, cells = stat + (small_obs - small_exp) ** 2 / max(small_exp, 1e-12), cells + 1
    dof = torch.tensor((cells - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))


def sample_counts(model, registry, drafter, verifier, config: SamplingConfig, drafter_options=None) -> dict:
    decoder = SpeculativeDecoder(model, None, drafter=drafter, controller="fixed", verifier=verifier,
                                 controller_options={"k": 2}, drafter_options=drafter_options, registry=registry)
    counts: dict[tuple, int] = {}
    for seed in range(SAMPLES):
        generator = decoder.stream_tokens(PROMPT, max_new_tokens=LENGTH, temperature=config.temperature,
                                          top_k=config.top_k, top_p=config.top_p, seed=seed)
        tokens = tuple(t for chunk in generator for t in chunk)
        counts[tokens] = counts.get(tokens, 0) + 1
    return counts


CASES = [
    ("skewed", {}, SamplingConfig(temperature=1.0)),
    ("self_exit", {"layer": 1}, SamplingConfig(temperature=1.0)),
    ("skewed", {}, SamplingConfig(temperature=1.5, top_k=3, top_p=0.9)),
]


@pytest.mark.parametrize("drafter,options,config", CASES)
def test_speculative_sampling_matches_the_exact_distribution(toy, toy_registry, drafter, options, config):
    expected = exact_distribution(toy, config)
    assert sum(prob > 0.01 for prob in expected.values()) >= 8, "toy distribution too peaked to test"
    counts = sample_counts(toy, toy_registry, drafter, "speculative", config, options)
    assert chi_square_p_value(counts, expected, SAMPLES) > 1e-3


def test_the_same_test_rejects_a_broken_verifier(toy, toy_registry):
    config = SamplingConfig(temperature=1.0)
    expected = exact_distribution(toy, config)
    counts = sample_counts(toy, toy_registry, "skewed", "always_accept", config)
    assert chi_square_p_value(counts, expected, SAMPLES) < 1e-6


def test_plain_sampling_through_the_engine_matches(toy, toy_registry):
    config = SamplingConfig(temperature=1.0)
    counts = sample_counts(toy, toy_registry, None, "auto", config)
    assert chi_square_p_value(counts, exact_distribution(toy, config), SAMPLES) > 1e-3
