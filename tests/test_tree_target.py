"""A tree pass scores every node as a chain pass over its path would, and keep_path compacts the
cache so that decoding goes on exactly as if only the accepted path had been run (fp32)."""

from __future__ import annotations

import pytest
import torch

from specframe.errors import PluginContractError, SpecframeError
from specframe.target import TargetModel
from specframe.trees import chain_parents, path_to

PROMPT = [5, 9, 2, 7, 7, 1, 3, 8]
ROOT_TOKEN = 11
SHAPES = {
    "chain": chain_parents(3),
    "star": (-1, -1, -1),
    "2x2": (-1, -1, 0, 0, 1, 1),
    "deep": (-1, 0, -1, 1, 2, 3, 0),
}


def _chain_logits(model, tokens: list[int], split: int | None = None) -> torch.Tensor:
    target = TargetModel(model)
    if split:
        target.enable_split(split)
    return target.forward(torch.tensor(tokens))


def _tree_target(model, parents, split: int | None = None):
    target = TargetModel(model)
    if split:
        target.enable_split(split)
    target.forward(torch.tensor(PROMPT))
    node_tokens = [(13 + 7 * i) % 64 for i in range(len(parents))]
    logits = target.forward_tree(torch.tensor([ROOT_TOKEN, *node_tokens]), parents)
    return target, node_tokens, logits


@pytest.mark.parametrize("split", [None, 2], ids=["whole", "split"])
@pytest.mark.parametrize("shape", SHAPES)
def test_each_node_is_scored_as_its_path_would_be(tiny_model, shape, split):
    parents = SHAPES[shape]
    _, node_tokens, logits = _tree_target(tiny_model, parents, split)
    assert logits.shape == (len(parents) + 1, tiny_model.config.vocab_size)
    torch.testing.assert_close(logits[0], _chain_logits(tiny_model, PROMPT + [ROOT_TOKEN])[-1], rtol=1e-4, atol=1e-4)
    for node in range(len(parents)):
        path = [node_tokens[n] for n in path_to(parents, node)]
        expected = _chain_logits(tiny_model, PROMPT + [ROOT_TOKEN] + path)[-1]
        torch.testing.assert_close(logits[node + 1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [None, 2], ids=["whole", "split"])
@pytest.mark.parametrize("shape", ["2x2", "deep"])
def test_after_keep_path_the_cache_is_the_accepted_chains(tiny_model, shape, split):
    parents = SHAPES[shape]
    leaf = len(parents) - 1
    path = tuple(path_to(parents, leaf))
    target, node_tokens, _ = _tree_target(tiny_model, parents, split)
    target.keep_path(path)
    committed = PROMPT + [ROOT_TOKEN] + [node_tokens[n] for n in path]
    assert target.length == target.cached_length() == len(committed)
    assert target.ids == committed
    after = target.forward(torch.tensor([4, 6]))  # decoding goes on from the compacted cache
    reference = TargetModel(tiny_model)
    if split:
        view = reference.enable_split(split)
    expected = reference.forward(torch.tensor(committed + [4, 6]))[-2:]
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    if split:  # the states at the split follow the path too
        torch.testing.assert_close(target._split_states(0, len(committed) + 2),
                                   view.hidden(0, len(committed) + 2), rtol=1e-4, atol=1e-4)


def test_keep_path_then_rollback_keeps_a_prefix_of_the_path(tiny_model):
    parents = SHAPES["deep"]
    target, node_tokens, _ = _tree_target(tiny_model, parents)
    target.keep_path((0, 1, 3))
    target.rollback(len(PROMPT) + 2)  # an EOS cut the path after its first node
    assert target.ids == PROMPT + [ROOT_TOKEN, node_tokens[0]]
    expected = _chain_logits(tiny_model, target.ids + [9])[-1]
    torch.testing.assert_close(target.forward(torch.tensor([9]))[-1], expected, rtol=1e-4, atol=1e-4)


def test_a_tree_needs_the_layered_path(tiny_model):
    target = TargetModel(tiny_model, layered=False)
    with pytest.raises(SpecframeError, match="not a Llama-style decoder"):
        target.forward_tree(torch.tensor([1, 2]), (-1,))


@pytest.mark.parametrize("lowered", [1, 3, 7])
def test_a_chain_the_drafter_lowered_at_the_head_of_the_tree_is_reused(tiny_model, lowered):
    parents = (-1, 0, 1, -1, 0, 1)  # a chain of three, then an alternative at each depth
    tokens = [ROOT_TOKEN, 20, 21, 22, 30, 31, 32]
    whole, _, _ = _tree_target(tiny_model, parents, split=2)
    whole.rollback(len(PROMPT))
    expected = whole.forward_tree(torch.tensor(tokens), parents)
    target = TargetModel(tiny_model)
    view = target.enable_split(2)
    target.forward(torch.tensor(PROMPT))
    view.lower(torch.tensor(tokens[: min(lowered, 4)]))  # the root and the chain only
    torch.testing.assert_close(target.forward_tree(torch.tensor(tokens), parents), expected, rtol=1e-4, atol=1e-4)
    target.keep_path((0, 4))
    assert target.ids == PROMPT + [ROOT_TOKEN, 20, 31]


def test_lowered_tokens_that_are_not_the_trees_head_chain_are_a_contract_error(tiny_model):
    target = TargetModel(tiny_model)
    view = target.enable_split(2)
    target.forward(torch.tensor(PROMPT))
    view.lower(torch.tensor([ROOT_TOKEN, 20, 21]))
    with pytest.raises(PluginContractError, match="the root and the tree's first nodes"):
        target.forward_tree(torch.tensor([ROOT_TOKEN, 20, 21]), (-1, -1))


def test_with_the_few_row_kernels_each_node_is_bitwise_a_one_token_pass_over_its_path(tiny_model):
    from specframe import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler: the few-row kernels are off")
    parents = SHAPES["2x2"]
    _, node_tokens, logits = _tree_target(tiny_model, parents)
    for node in range(len(parents)):
        target = TargetModel(tiny_model)
        target.forward(torch.tensor(PROMPT))
        for token in [ROOT_TOKEN] + [node_tokens[n] for n in path_to(parents, node)]:
            row = target.forward(torch.tensor([token]))[-1]
        assert torch.equal(logits[node + 1], row), node


@pytest.mark.parametrize("shape, lowered", [("2x2", 2), ("2x2", 4), ("deep", 5), ("star", 3)])
def test_nodes_lowered_as_a_tree_are_reused_by_the_tree_pass(tiny_model, shape, lowered):
    """`SplitView.lower_tree`: a drafter lowers the root, then the tree's first nodes level by level
    (as a dynamic tree does); the tree pass and keep_path give what a pass over the whole tree does."""
    parents = SHAPES[shape]
    whole, node_tokens, expected = _tree_target(tiny_model, parents, split=2)
    target = TargetModel(tiny_model)
    view = target.enable_split(2)
    target.forward(torch.tensor(PROMPT))
    view.lower(torch.tensor([ROOT_TOKEN]))
    hidden = [view.lower_tree(torch.tensor(node_tokens[i : i + 2]), parents[i : i + 2]) for i in range(0, lowered, 2)]
    assert sum(h.shape[0] for h in hidden) == min(len(parents), lowered + lowered % 2)
    tokens = torch.tensor([ROOT_TOKEN, *node_tokens])
    torch.testing.assert_close(target.forward_tree(tokens, parents), expected, rtol=1e-4, atol=1e-4)
    path = tuple(path_to(parents, len(parents) - 1))
    whole.keep_path(path)
    target.keep_path(path)
    torch.testing.assert_close(target._split_states(0, target.length), whole._split_states(0, whole.length),
                               rtol=1e-4, atol=1e-4)


def test_nodes_lowered_as_a_tree_cannot_be_verified_as_a_chain_nor_as_another_tree(tiny_model):
    target = TargetModel(tiny_model)
    view = target.enable_split(2)
    target.forward(torch.tensor(PROMPT))
    view.lower(torch.tensor([ROOT_TOKEN]))
    view.lower_tree(torch.tensor([20, 21]), (-1, -1))
    with pytest.raises(PluginContractError, match="lowered as a tree"):
        target.forward(torch.tensor([ROOT_TOKEN, 20, 21]))
    with pytest.raises(PluginContractError, match="the root and the tree's first nodes"):
        target.forward_tree(torch.tensor([ROOT_TOKEN, 20, 21]), (-1, 0))
    with pytest.raises(PluginContractError, match="parents before children"):
        view.lower_tree(torch.tensor([22]), (5,))
