"""The speculative-sampling verifier is exact: computed analytically, not by sampling.

We enumerate every path through the *real* `speculative_step`: each uniform comparison branches
into accept/reject with its exact probability, and each call to `sample(dist)` branches over the
tokens of `dist`. Drafts are enumerated with their probability under q. Completing every outcome
with target tokens must give exactly the target's joint distribution.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from specframe.verifiers.greedy import GreedyVerifier
from specframe.verifiers.speculative import residual_distribution, speculative_step

from .exact_draws import assert_same, complete, enumerate_outcomes, target_joint


def enumerate_verdicts(draft_tokens, q, p):
    """Every (accepted_length, next_token) of speculative_step with its exact probability."""
    def step(uniforms, sample):
        verdict = speculative_step(draft_tokens, q, p, uniforms, sample)
        return verdict.accepted_length, verdict.next_token

    return enumerate_outcomes(step)


def random_table(seed: int, V: int, peaked: bool):
    """A deterministic prefix -> (V,) distribution, with some exact zeros and ties."""
    cache = {}

    def dist(prefix):
        if prefix not in cache:
            g = torch.Generator().manual_seed(hash((seed, prefix)) % (2**31))
            logits = torch.randn(V, generator=g, dtype=torch.float64) * (4 if peaked else 1)
            probs = torch.softmax(logits, 0)
            probs[torch.rand(V, generator=g) < 0.25] = 0  # exact zeros
            if probs.sum() == 0:
                probs[0] = 1
            cache[prefix] = probs / probs.sum()
        return cache[prefix]

    return dist


def speculative_joint(p_of, q_of, K, V):
    """Exact distribution of K+1 tokens: one verification round, then completed by the target."""
    joint = {}
    for drafts in itertools.product(range(V), repeat=K):
        q_rows = [q_of(drafts[:i]) for i in range(K)]
        weight = float(torch.prod(torch.stack([q_rows[i][d] for i, d in enumerate(drafts)]))) if K else 1.0
        if weight > 0:
            _add_round(joint, drafts, torch.stack(q_rows) if K else None, weight, p_of, K)
    return joint


def _add_round(joint, drafts, q, weight, p_of, K):
    p = torch.stack([p_of(drafts[:i]) for i in range(K + 1)])
    for (a, token), prob in enumerate_verdicts(torch.tensor(drafts, dtype=torch.long), q, p).items():
        complete(joint, drafts[:a] + (token,), weight * prob, p_of, K + 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), V=st.integers(2, 16), peaked=st.booleans())
def test_single_step_outcome_is_exactly_p(seed, V, peaked):
    p_of, q_of = random_table(seed, V, peaked), random_table(seed + 1, V, not peaked)
    assert_same(speculative_joint(p_of, q_of, 1, V), target_joint(p_of, 2))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), V=st.integers(2, 5), K=st.integers(2, 3), peaked=st.booleans())
def test_chain_of_k_drafts_is_exactly_the_target_joint(seed, V, K, peaked):
    p_of, q_of = random_table(seed, V, peaked), random_table(seed + 7, V, peaked)
    assert_same(speculative_joint(p_of, q_of, K, V), target_joint(p_of, K + 1))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), V=st.integers(2, 6), K=st.integers(1, 3))
def test_deterministic_drafter_one_hot_q_is_exact(seed, V, K):
    """A deterministic drafter (q=None, i.e. one-hot) proposing any fixed sequence is exact."""
    p_of = random_table(seed, V, False)
    drafts = tuple((seed // (i + 1)) % V for i in range(K))
    joint = {}
    _add_round(joint, drafts, None, 1.0, p_of, K)
    assert_same(joint, target_joint(p_of, K + 1))


def test_zero_residual_mass_falls_back_to_p():
    """Zero residual mass means p <= q everywhere, so p == q; speculative_step then accepts
    with certainty and never asks for the residual, so the fallback is checked directly."""
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    assert torch.equal(residual_distribution(p, p.clone()), p)
    assert enumerate_verdicts(torch.tensor([1]), p[None].clone(), torch.stack([p, p])) == {(1, 0): 0.5, (1, 1): 0.5}


def test_a_rejection_at_the_second_position_samples_that_positions_residual():
    """d1 is always accepted (p1 == q1); d2 = 0 is rejected with probability 1 - 0.2/0.8 = 0.75,
    and the correction comes from norm(max(0, p2 - q2)) = token 1 only."""
    p = torch.tensor([[0.0, 1.0], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0], [0.8, 0.2]], dtype=torch.float64)
    outcomes = enumerate_verdicts(torch.tensor([1, 0]), q, p)
    assert outcomes[(1, 1)] == pytest.approx(0.75) and outcomes[(2, 0)] == pytest.approx(0.125)
    assert set(outcomes) == {(1, 1), (2, 0), (2, 1)}


def test_bonus_token_comes_from_the_last_row():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert enumerate_verdicts(torch.tensor([1]), q, p) == {(1, 2): 1.0}


def test_the_exact_check_catches_a_broken_verifier(monkeypatch):
    """Sampling the correction from p instead of the residual is biased, and the check sees it."""
    import specframe.verifiers.speculative as module

    monkeypatch.setattr(module, "residual_distribution", lambda p_i, q_i: p_i)
    p_of, q_of = random_table(3, 4, False), random_table(4, 4, True)
    with pytest.raises(AssertionError):
        assert_same(speculative_joint(p_of, q_of, 1, 4), target_joint(p_of, 2))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), V=st.integers(2, 16), K=st.integers(0, 6))
def test_greedy_verifier_accepts_the_longest_argmax_prefix(seed, V, K):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(K + 1, V, generator=g), -1)
    drafts = torch.where(torch.rand(K, generator=g) < 0.7, p[:K].argmax(-1), torch.randint(0, V, (K,), generator=g))
    verdict = GreedyVerifier().verify(drafts, None, p, None)
    expected = 0
    while expected < K and drafts[expected] == p[expected].argmax():
        expected += 1
    assert verdict.accepted_length == expected
    assert verdict.next_token == int(p[expected].argmax())
