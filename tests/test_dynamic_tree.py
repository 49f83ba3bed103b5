"""early_exit's dynamic tree (`--drafter-opt width=W,tree=dynamic`, EAGLE-2 style): the shape
follows the head's confidence, nodes are expanded through the target's lower layers and the head
with a tree mask, and decoding stays lossless (fp32 greedy token for token; sampling exact by
enumeration; the conformance kit)."""

from __future__ import annotations

import pytest
import torch

from specframe import SpeculativeDecoder, testing
from specframe.drafters.dynamic_tree import draft_dynamic_tree
from specframe.plugins import PluginRegistry
from specframe.sampling import Sampler
from specframe.trees import depths
from specframe.types import SamplingConfig

from .test_conformance import FAST, drafter_options
from .test_early_exit_tree import _plain, tiny_head_path  # noqa: F401 - a fixture


class _Keep:
    def __init__(self, depth=99):
        self.depth = depth

    def keep_drafting(self, drafted, confidence):
        return drafted < self.depth


def _table_logits(token: int) -> torch.Tensor:
    return 3 * torch.randn(12, generator=torch.Generator().manual_seed(token))


def _values(draft, root: int):
    """Each node's value: the product of softmax probabilities along its path."""
    values = []
    for node, parent in enumerate(draft.parents):
        before = 1.0 if parent == -1 else values[parent]
        context = root if parent == -1 else int(draft.tokens[parent])
        values.append(before * float(torch.softmax(_table_logits(context), -1)[draft.tokens[node]]))
    return values


@pytest.mark.parametrize("width, budget", [(2, 6), (3, 10), (4, 16)])
def test_the_tree_holds_the_nodes_of_highest_value_at_each_depth(width, budget):
    """Each depth's nodes beat every candidate of that depth left out (a top-`width` child of an
    expanded node that is not in the tree), whether they were expanded or filled in as leaves; the
    expanded nodes come first, parents before children."""
    expanded = []

    def expand(tokens, parents):
        expanded.append(len(tokens))
        return torch.stack([_table_logits(int(t)) for t in tokens])

    draft = draft_dynamic_tree(_table_logits, expand, 0, budget, width, _Keep(), Sampler(SamplingConfig()))
    assert len(draft) == budget and draft.q is None and all(p < i for i, p in enumerate(draft.parents))
    values, depth = _values(draft, 0), depths(draft.parents)
    listed = set(zip(draft.parents, draft.tokens.tolist()))
    for node in range(-1, sum(expanded)):  # the root and the expanded nodes, a prefix of the tree
        context = 0 if node == -1 else int(draft.tokens[node])
        base, at = (1.0, 1) if node == -1 else (values[node], depth[node] + 1)
        for p, t in zip(*torch.topk(torch.softmax(_table_logits(context), -1), width)):
            if (node, int(t)) not in listed:
                assert base * float(p) <= min(v for v, d in zip(values, depth) if d == at) + 1e-12
    assert max(depth) >= 2


def test_the_controller_bounds_the_depth():
    sampler = Sampler(SamplingConfig())
    expand = lambda tokens, parents: torch.stack([_table_logits(int(t)) for t in tokens])  # noqa: E731
    draft = draft_dynamic_tree(_table_logits, expand, 0, 30, 3, _Keep(depth=2), sampler)
    assert max(depths(draft.parents)) == 2


@pytest.mark.parametrize("width, controller, options", [(2, "fixed", {"k": 6}), (3, "fixed", {"k": 10}),
                                                        (2, "thompson", None),
                                                        (1, "thompson_cost", {"max_width": 3, "min_k": 1})])
def test_greedy_dynamic_trees_equal_plain_decoding(tiny_model, stub_tokenizer, registry, tiny_head_path,  # noqa: F811
                                                   width, controller, options):
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller=controller,
                                 drafter_options={"head": tiny_head_path, "width": width, "tree": "dynamic"},
                                 controller_options=options, registry=registry)
    for prompt, max_new in (([5, 9, 2, 33, 5, 9], 40), ([1], 17), (list(range(3, 40)), 25)):
        expected = _plain(tiny_model, prompt, max_new)
        for _ in range(2):
            result = decoder.generate(prompt, max_new_tokens=max_new)
            assert result.tokens == expected
        assert result.stats.accepted > 0


def test_dynamic_trees_pass_the_kit(tmp_path):
    options = {**drafter_options("early_exit", tmp_path), "width": 2, "tree": "dynamic"}
    report = testing.check_drafter("early_exit", options=options, settings=FAST,
                                   registry=PluginRegistry(autoload=False))
    assert report.passed
    assert "q=None, one draft tree" in next(r.detail for r in report.results if r.check == "q_sampling")


@pytest.mark.parametrize("temperature", [0.8])
def test_sampling_with_a_dynamic_tree_is_exactly_the_target_distribution(temperature):
    from specframe.testing import autoregressive_distribution, engine_distribution, largest_difference
    from specframe.testing.common import FLOAT32_TOLERANCE

    from .conftest import tiny_llama
    from .test_early_exit import train_tiny_head
    from .test_lossless_sampling import PROMPT

    toy = tiny_llama(vocab_size=4, num_layers=2, hidden_size=16, seed=3, init=0.6)
    head, _, _ = train_tiny_head(toy, layer=1, steps_epochs=2)
    registry, config = PluginRegistry(autoload=False), SamplingConfig(temperature=temperature)
    parts = lambda: (registry.create("drafter", "early_exit", {"head": head, "width": 2, "tree": "dynamic"}),  # noqa: E731
                     registry.create("controller", "fixed", {"k": 4}),
                     registry.create("verifier", "speculative", {}))
    got = engine_distribution(toy, parts, PROMPT, 4, config)
    expected = autoregressive_distribution(toy, PROMPT, 4, config)
    assert largest_difference(got, expected)[0] <= FLOAT32_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("controller, options", [("fixed", {"k": 12}), ("thompson_cost", {"max_width": 4})])
def test_default_model_greedy_dynamic_tree_equality_with_the_shipped_head(registry, controller, options):
    from specframe.models import load_model

    model, tokenizer = load_model(dtype="fp32")
    text = "Explain what a hash table is."
    expected = SpeculativeDecoder(model, tokenizer, drafter=None, registry=registry).generate(
        text, max_new_tokens=48).tokens
    decoder = SpeculativeDecoder(model, tokenizer, drafter="early_exit", controller=controller, registry=registry,
                                 controller_options=options, drafter_options={"width": 3, "tree": "dynamic"})
    result = decoder.generate(text, max_new_tokens=48)
    assert result.tokens == expected and result.stats.tree_rounds > 0
