"""The engine decodes with tree drafts: greedy output equals plain decoding token for token (fp32),
a chain sent as a tree gives the chain's exact output when sampling, and a verifier that cannot
verify trees is a named fault."""

from __future__ import annotations

import pytest
import torch
from attrs import define, field

from specframe.engine import Parts, generate_tokens
from specframe.errors import PluginContractError
from specframe.interfaces import Drafter
from specframe.sampling import Sampler
from specframe.target import TargetModel
from specframe.trees import chain_parents, path_to
from specframe.types import Draft, SamplingConfig
from specframe.verifiers import AutoVerifier, GreedyVerifier, SpeculativeSamplingVerifier

from .conftest import tiny_llama
from .test_lossless_greedy import plain_greedy

PROMPTS = [[5, 9, 2, 33, 5, 9], [1, 2, 3, 4], [17]]


def tree_of(branching: tuple[int, ...]) -> tuple[int, ...]:
    """The fixed-shape tree whose nodes at depth d have branching[d] children, breadth first."""
    parents, level = [], [-1]
    for width in branching:
        next_level = []
        for parent in level:
            for _ in range(width):
                parents.append(parent)
                next_level.append(len(parents) - 1)
        level = next_level
    return tuple(parents)


@define
class ModelTreeDrafter(Drafter):
    """Drafts a fixed-shape tree with a (tiny) model, recomputing each node from scratch.

    order: the ranks of q that the children of a node take, in turn (greedy); when sampling,
    children are drawn independently from q (with replacement). as_chain: send a chain without parents.
    """

    model: object
    parents: tuple[int, ...]
    order: tuple[int, ...] = (1, 0, 2, 3)
    as_chain: bool = False
    rounds: list = field(factory=list)

    def _q(self, tokens: list[int], sampler) -> torch.Tensor:
        logits = self.model(torch.tensor([tokens])).logits[0, -1].float()
        return sampler.probs(logits[None])[0]

    @torch.inference_mode()
    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        parents = self.parents[:max_tokens]
        tokens, rows, rank_of = [], [], {}
        for node, parent in enumerate(parents):
            path = [tokens[n] for n in path_to(parents, parent)]
            q = self._q(list(context) + path, sampler)
            rank_of[parent] = rank = rank_of.get(parent, -1) + 1
            if sampler.greedy:
                tokens.append(int(torch.argsort(q, descending=True, stable=True)[self.order[rank]]))
            else:
                tokens.append(sampler.sample(q))
            rows.append(q)
        self.rounds.append(len(tokens))
        q = None if sampler.greedy else torch.stack(rows)
        return Draft(torch.tensor(tokens, dtype=torch.long), q, parents=None if self.as_chain else parents)


class _Fixed:
    def __init__(self, k):
        self.k = k

    def begin(self):
        pass

    def max_draft(self):
        return self.k

    def keep_drafting(self, drafted, confidence):
        return True

    def update(self, round_stats):
        pass


def decode(model, drafter, prompt, max_new, verifier=None, temperature=0.0, seed=0, eos=(), on_error="fail"):
    parts = Parts(TargetModel(model), drafter, _Fixed(len(drafter.parents)), verifier or AutoVerifier())
    sampler = Sampler(SamplingConfig(temperature=temperature, seed=seed))
    stream = generate_tokens(parts, prompt, sampler, max_new, set(eos), on_error=on_error)
    tokens = []
    try:
        while True:
            tokens += next(stream)
    except StopIteration as stop:
        stats, _ = stop.value
    return tokens, stats


@pytest.mark.parametrize("branching", [(2, 2), (3,), (1, 1, 1), (2, 1, 1)])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tree_decoding_is_plain_greedy_token_for_token(tiny_model, prompt, branching):
    drafter = ModelTreeDrafter(tiny_model, tree_of(branching))
    tokens, stats = decode(tiny_model, drafter, prompt, 24, GreedyVerifier())
    assert tokens == plain_greedy(tiny_model, prompt, 24)
    # children take the ranks 1, 0, 2: with two or more at the root, its argmax child is accepted
    assert (stats.accepted > 0) == (branching[0] >= 2)


def test_greedy_trees_from_another_model_are_lossless_too(tiny_model):
    drafter = ModelTreeDrafter(tiny_llama(seed=3, init=0.3), tree_of((2, 2)), order=(0, 1))
    prompt = PROMPTS[0]
    assert decode(tiny_model, drafter, prompt, 30)[0] == plain_greedy(tiny_model, prompt, 30)


def test_eos_inside_an_accepted_path_stops_there(tiny_model):
    prompt = PROMPTS[1]
    reference = plain_greedy(tiny_model, prompt, 20)
    eos = reference[6]
    expected = reference[: reference.index(eos) + 1]
    tokens, _ = decode(tiny_model, ModelTreeDrafter(tiny_model, tree_of((2, 2))), prompt, 20, eos=(eos,))
    assert tokens == expected


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_a_chain_sent_as_a_tree_samples_exactly_what_the_chain_does(tiny_model, temperature):
    outputs = []
    for as_chain in (True, False):
        drafter = ModelTreeDrafter(tiny_llama(seed=3, init=0.3), chain_parents(3), as_chain=as_chain)
        outputs.append(decode(tiny_model, drafter, PROMPTS[0], 20, SpeculativeSamplingVerifier(),
                              temperature=temperature, seed=11)[0])
    assert outputs[0] == outputs[1]


def test_sampling_with_a_tree_runs_and_keeps_the_cache_invariant(tiny_model):
    drafter = ModelTreeDrafter(tiny_model, tree_of((2, 2)))
    tokens, stats = decode(tiny_model, drafter, PROMPTS[0], 25, temperature=0.8, seed=4)
    assert len(tokens) == 25 and stats.accepted > 0


class ChainOnlyVerifier:
    def verify(self, draft_tokens, q, p, sampler):
        return GreedyVerifier().verify(draft_tokens, q, p, sampler)


def test_a_verifier_without_verify_tree_is_a_named_fault(tiny_model):
    drafter = ModelTreeDrafter(tiny_model, tree_of((2,)))
    with pytest.raises(PluginContractError, match="has verify_tree"):
        decode(tiny_model, drafter, PROMPTS[0], 5, ChainOnlyVerifier())
    with pytest.warns(RuntimeWarning, match="plain decoding"):
        tokens, stats = decode(tiny_model, drafter, PROMPTS[0], 12, ChainOnlyVerifier(), on_error="fallback")
    assert tokens == plain_greedy(tiny_model, PROMPTS[0], 12) and stats.fallback
