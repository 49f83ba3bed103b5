"""The tree verifiers are exact: one verification round over a tree, enumerated analytically.

For a tree shape and a way of drafting siblings (independently, without replacement, or the
deterministic top candidates), we enumerate every draft tree with its probability, every path
through the real `tree_speculative_step` (each uniform comparison branches into accept and
reject with its exact probability, each `sample(dist)` over the tokens of dist), and complete
each outcome with target tokens. The result must be the target's own joint distribution.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from specframe.sampling import probs_from_logits
from specframe.trees import chain_parents, children, depths, path_to, without_replacement_rows
from specframe.types import SamplingConfig
from specframe.verifiers.tree import greedy_tree_step, tree_speculative_step

from .exact_draws import assert_same, complete, enumerate_outcomes, target_joint

SHAPES = {
    "chain": chain_parents(2),
    "star": (-1, -1, -1),
    "2x2": (-1, -1, 0, 0, 1, 1),
    "uneven": (-1, 0, -1, 1, 0),
}


def enumerate_tree_verdicts(parents, tokens, q, p, step=tree_speculative_step):
    """Every (path, next_token) of `step` with its exact probability."""
    def run(uniforms, sample):
        verdict = step(parents, tokens, q, p, uniforms, sample)
        return verdict.path, verdict.next_token

    return enumerate_outcomes(run)


def distribution_table(seed: int, V: int, temperature: float, zeros: bool):
    """prefix -> (V,) float64 distribution from random logits at `temperature`, some with exact zeros."""
    cache, config = {}, SamplingConfig(temperature=temperature)

    def dist(prefix):
        if prefix not in cache:
            g = torch.Generator().manual_seed(hash((seed, prefix)) % (2**31))
            logits = torch.randn(V, generator=g, dtype=torch.float64) * 2
            if zeros:
                logits[torch.rand(V, generator=g) < 0.25] = float("-inf")
                if torch.isinf(logits).all():
                    logits[0] = 0.0
            probs = probs_from_logits(logits[None], config)[0].double()
            cache[prefix] = probs / probs.sum()
        return cache[prefix]

    return dist


def _node_prefix(parents, tokens, node):
    return tuple(tokens[n] for n in path_to(parents, node))


def draft_trees(parents, q_of, V, scheme):
    """Every (tokens, q rows or None, probability) a drafter of this `scheme` can propose."""
    K = len(parents)
    if scheme == "top":  # deterministic: the j-th child is the parent's j-th most likely token
        tokens = [0] * K
        for node in range(K):
            rank = children(parents)[parents[node]].index(node)
            order = torch.argsort(q_of(_node_prefix(parents, tokens, parents[node])), descending=True, stable=True)
            tokens[node] = int(order[rank])
        yield tokens, None, 1.0
        return
    for tokens in itertools.product(range(V), repeat=K):
        rows = [_q_row(parents, list(tokens), q_of, node, scheme) for node in range(K)]
        if any(row is None for row in rows):
            continue
        weight = 1.0
        for node, row in enumerate(rows):
            weight *= float(row[tokens[node]])
        if weight > 0:
            yield list(tokens), torch.stack(rows), weight


def _q_row(parents, tokens, q_of, node, scheme):
    q_parent = q_of(_node_prefix(parents, tokens, parents[node]))
    if scheme == "independent":
        return q_parent
    earlier = children(parents)[parents[node]]
    earlier = earlier[: earlier.index(node)]
    if float(q_parent.sum() - sum(q_parent[tokens[s]] for s in earlier)) <= 1e-12:
        return None  # nothing left to draw without replacement
    return without_replacement_rows(q_parent, [tokens[s] for s in earlier] + [tokens[node]])[-1]


def tree_round_joint(parents, p_of, q_of, V, scheme, step=tree_speculative_step):
    """Exact distribution of depth+1 tokens: one verification round of the tree, then the target."""
    length = max(depths(parents), default=0) + 1
    joint = {}
    for tokens, q, weight in draft_trees(parents, q_of, V, scheme):
        p = torch.stack([p_of(())] + [p_of(_node_prefix(parents, tokens, n)) for n in range(len(parents))])
        token_tensor = torch.tensor(tokens, dtype=torch.long)
        for (path, token), prob in enumerate_tree_verdicts(parents, token_tensor, q, p, step).items():
            committed = tuple(tokens[n] for n in path) + (token,)
            complete(joint, committed, weight * prob, p_of, length)
    return joint


def _tables(seed, V, temperature, scheme):
    # without replacement needs q > 0 on enough tokens; the other schemes get exact zeros
    return (distribution_table(seed, V, temperature, zeros=True),
            distribution_table(seed + 1, V, temperature, zeros=scheme != "without"))


@pytest.mark.parametrize("scheme", ["independent", "without", "top"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature, seed", [(0.6, 1), (1.0, 2), (1.7, 3)])
def test_one_tree_round_commits_exactly_the_target_distribution(shape, scheme, temperature, seed):
    parents, V = SHAPES[shape], (3 if len(SHAPES[shape]) > 4 else 4)
    p_of, q_of = _tables(seed, V, temperature, scheme)
    length = max(depths(parents)) + 1
    assert_same(tree_round_joint(parents, p_of, q_of, V, scheme), target_joint(p_of, length))


@pytest.mark.parametrize("shape", ["star", "2x2"])
def test_at_temperature_0_sampling_verification_is_the_target_argmax(shape):
    parents = SHAPES[shape]
    p_of, q_of = _tables(5, 3, 0.0, "independent")
    assert_same(tree_round_joint(parents, p_of, q_of, 3, "top"), target_joint(p_of, max(depths(parents)) + 1))


def test_the_exact_check_catches_a_verifier_that_forgets_the_residual(monkeypatch):
    """Trying each sibling against p itself (not the residual after the earlier rejections)
    over-produces tokens that several siblings propose; the check sees it."""
    import specframe.verifiers.tree as module

    monkeypatch.setattr(module, "residual_distribution", lambda residual, q_j: residual)
    p_of, q_of = _tables(2, 4, 1.0, "independent")
    with pytest.raises(AssertionError):
        assert_same(tree_round_joint(SHAPES["star"], p_of, q_of, 4, "independent"), target_joint(p_of, 2))


def test_the_exact_check_catches_siblings_verified_with_the_parents_q():
    """Siblings drawn without replacement but verified as if drawn independently are biased."""
    p_of, q_of = _tables(0, 4, 1.0, "without")

    def parents_q(parents, tokens, q, p, uniforms, sample):
        rows = torch.stack([q_of(_node_prefix(parents, tokens.tolist(), parents[n])) for n in range(len(parents))])
        return tree_speculative_step(parents, tokens, rows, p, uniforms, sample)

    with pytest.raises(AssertionError):
        assert_same(tree_round_joint(SHAPES["star"], p_of, q_of, 4, "without", parents_q), target_joint(p_of, 2))


def test_a_chain_tree_gives_the_chain_verifiers_outcomes():
    from specframe.verifiers.speculative import speculative_step

    from .test_verifier_exact import enumerate_verdicts

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 5, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1)
    tokens = torch.tensor([1, 3, 0])
    tree = enumerate_tree_verdicts(chain_parents(3), tokens, q, p)
    chain = enumerate_verdicts(tokens, q, p)
    assert set(chain) == {(len(path), t) for path, t in tree}
    for (path, t), prob in tree.items():
        assert prob == pytest.approx(chain[(len(path), t)], abs=1e-12)
    assert speculative_step  # the chain verifier the comparison is against


def test_greedy_tree_step_follows_the_argmax_as_deep_as_the_tree_goes():
    parents = SHAPES["2x2"]  # root -> 0, 1; 0 -> 2, 3; 1 -> 4, 5
    tokens = torch.tensor([4, 2, 1, 3, 0, 5])
    p = torch.zeros(7, 6)
    for row, best in enumerate([2, 0, 5, 1, 1, 3, 2]):  # the target's argmax after each scored token
        p[row, best] = 1.0
    # after the root the target wants 2 = node 1; after node 1 it wants 5 = node 5; after node 5: 2
    verdict = greedy_tree_step(parents, tokens, p)
    assert (verdict.path, verdict.next_token) == ((1, 5), 2)
    p[0] = torch.nn.functional.one_hot(torch.tensor(3), 6)  # no child is 3
    verdict = greedy_tree_step(parents, tokens, p)
    assert (verdict.path, verdict.next_token) == ((), 3)
