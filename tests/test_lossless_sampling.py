"""Sampled speculative decoding follows exactly the target's distribution.

A tiny float64 Llama with a 4-token vocabulary. The engine's distribution of 4-token continuations
(a first round of 2 drafts, so chains, the residual at position 2 and per-position draws are all
exercised; longer chains: tests/test_exact_engine.py) is computed exactly by enumerating every draw (`specframe.testing.exact`) and
must equal plain sampling's; the same check rejects a deliberately broken verifier. One
statistical test remains for the public API with the real seeded sampler, with its power stated.
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
from specframe.testing import autoregressive_distribution, chi_square_power, engine_distribution, largest_difference
from specframe.testing.common import FLOAT32_TOLERANCE
from specframe.types import SamplingConfig

from .conftest import tiny_llama
from .fixtures.broken_plugins import ScaledAcceptVerifier

V, LENGTH, PROMPT, SAMPLES = 4, 3, [1, 2, 3], 1500
EXACT_LENGTH, K = 4, 3  # 4 new tokens: the first round drafts 2 (the engine keeps a slot for the target's)


@define
class SkewedDrafter(Drafter):
    """Samples from a fixed distribution far from the target's, so rejections are frequent."""

    def propose(self, context, max_tokens, controller, sampler):
        q_row = sampler.probs(torch.tensor([[2.0, -1.0, 0.5, 0.0]], dtype=torch.float64))[0]
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
        register("scaled_accept", ScaledAcceptVerifier)


@pytest.fixture(scope="module")
def toy():
    return tiny_llama(vocab_size=V, num_layers=2, hidden_size=16, seed=3, init=0.6)


@pytest.fixture(scope="module")
def toy64():
    return tiny_llama(vocab_size=V, num_layers=2, hidden_size=16, seed=3, init=0.6, dtype=torch.float64)


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


def exact_difference(model, registry, drafter, verifier, config: SamplingConfig, options=None) -> float:
    """max |P_engine(sequence) - P_target(sequence)| over all 4-token continuations, exactly."""
    def parts():
        made = registry.create("drafter", drafter, options or {}) if drafter else None
        return made, registry.create("controller", "fixed", {"k": K}), registry.create("verifier", verifier, {})

    got = engine_distribution(model, parts, PROMPT, EXACT_LENGTH, config, max_replays=40_000)
    return largest_difference(got, autoregressive_distribution(model, PROMPT, EXACT_LENGTH, config))[0]


CASES = [  # (drafter, options, sampling, tolerance): self_exit's q is float32, the skewed drafter's float64
    ("skewed", {}, SamplingConfig(temperature=1.0, top_k=2), 1e-9),
    ("skewed", {}, SamplingConfig(temperature=1.5, top_k=3, top_p=0.8), 1e-9),
    ("self_exit", {"layer": 1}, SamplingConfig(temperature=0.7, top_k=2), FLOAT32_TOLERANCE),
]


@pytest.mark.parametrize("drafter,options,config,tolerance", CASES)
def test_speculative_sampling_is_exactly_the_target_distribution(toy64, toy_registry, drafter, options, config,
                                                                 tolerance):
    assert exact_difference(toy64, toy_registry, drafter, "speculative", config, options) <= tolerance


def test_the_exact_check_rejects_a_broken_verifier(toy64, toy_registry):
    config = SamplingConfig(temperature=1.0, top_k=2)
    assert exact_difference(toy64, toy_registry, "skewed", "scaled_accept", config) > 1e-3


def test_plain_sampling_through_the_api_matches(toy, toy_registry):
    """The public API with the real seeded sampler: chi-square over 64 sequences, whose power
    against 5 % of the probability moved between the two likeliest is stated and checked."""
    config = SamplingConfig(temperature=1.0)
    expected = exact_distribution(toy, config)
    counts = sample_counts(toy, toy_registry, None, "auto", config)
    assert chi_square_p_value(counts, expected, SAMPLES) > 1e-3
    assert chi_square_power({s: p * SAMPLES for s, p in expected.items()}, 1e-3) > 0.5


def test_speculative_sampling_through_the_api_matches(toy, toy_registry):
    config = SamplingConfig(temperature=1.0)
    counts = sample_counts(toy, toy_registry, "skewed", "speculative", config)
    assert chi_square_p_value(counts, exact_distribution(toy, config), SAMPLES) > 1e-3
