"""Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling").

Letters as in the papers: p is the target's distribution, q the drafter's.
"""

from __future__ import annotations

import torch
from attrs import frozen

from specframe.interfaces import Verifier
from specframe.types import TreeVerdict, Verdict

from .greedy import GreedyVerifier


def residual_distribution(p_i: torch.Tensor, q_i: torch.Tensor) -> torch.Tensor:
    """(V,) norm(max(0, p - q)); falls back to p when that mass is zero (p == q)."""
    residual = torch.clamp(p_i - q_i, min=0)
    mass = residual.sum()
    return residual / mass if mass > 0 else p_i


def one_hot_rows(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens, V).float()


def speculative_step(draft_tokens, q, p, uniforms, sample) -> Verdict:
    """The rejection-sampling chain, with the random draws passed in.

    draft_tokens (K,), q (K, V) or None (deterministic drafter: one-hot q), p (K+1, V),
    uniforms: K numbers in [0, 1); sample: callable that draws one token from a (V,) distribution.
    """
    K, V = draft_tokens.shape[0], p.shape[-1]
    if q is None:
        q = one_hot_rows(draft_tokens, V)
    for i in range(K):
        token = int(draft_tokens[i])
        p_token, q_token = float(p[i, token]), float(q[i, token])
        if q_token > 0 and uniforms[i] < min(1.0, p_token / q_token):
            continue
        return Verdict(i, sample(residual_distribution(p[i], q[i])))
    return Verdict(K, sample(p[K]))


@frozen
class SpeculativeSamplingVerifier(Verifier):
    """Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); on rejection sample from
    norm(max(0, p_i - q_i)); if all K are accepted, sample the bonus token from p_{K+1}.

    The committed tokens then follow exactly the target's distribution p.
    """

    def verify(self, draft_tokens, q, p, sampler) -> Verdict:
        uniforms = _LazyUniforms(sampler)
        return speculative_step(draft_tokens, q, p, uniforms, sampler.sample)

    def verify_tree(self, draft, p, sampler) -> TreeVerdict:
        """Recursive rejection sampling down a tree draft (`verifiers.tree`); p (K+1, V)."""
        from .tree import tree_speculative_step

        return tree_speculative_step(draft.parents, draft.tokens, draft.q, p, _LazyUniforms(sampler), sampler.sample)


class _LazyUniforms:
    """Draw a uniform only when the chain reaches that position."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __getitem__(self, i: int) -> float:
        return self.sampler.uniform()


@frozen
class AutoVerifier(Verifier):
    """Greedy verification at temperature 0, speculative sampling otherwise."""

    def verify(self, draft_tokens, q, p, sampler) -> Verdict:
        chosen = GreedyVerifier() if sampler.greedy else SpeculativeSamplingVerifier()
        return chosen.verify(draft_tokens, q, p, sampler)

    def verify_tree(self, draft, p, sampler) -> TreeVerdict:
        chosen = GreedyVerifier() if sampler.greedy else SpeculativeSamplingVerifier()
        return chosen.verify_tree(draft, p, sampler)
