"""Tree drafts: their shape, its contract checks, and the tree attention mask."""

from __future__ import annotations

import pytest
import torch

from specframe.checks import check_draft, check_parents, check_tree_verdict
from specframe.errors import PluginContractError
from specframe.trees import ancestors_mask, chain_parents, children, depths, path_to, tree_attention_mask, \
    tree_positions
from specframe.types import Draft, TreeVerdict

# root -> a, b; a -> c, d; c -> e
SHAPE = (-1, -1, 0, 0, 2)


def test_the_chain_is_the_tree_minus_one_zero_one():
    assert chain_parents(4) == (-1, 0, 1, 2)
    assert chain_parents(0) == ()
    assert depths(chain_parents(4)) == [1, 2, 3, 4]
    assert ancestors_mask(chain_parents(3)).equal(torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_depths_children_and_paths_of_a_tree():
    assert depths(SHAPE) == [1, 1, 2, 2, 3]
    assert children(SHAPE) == {-1: [0, 1], 0: [2, 3], 1: [], 2: [4], 3: [], 4: []}
    assert path_to(SHAPE, 4) == [0, 2, 4]
    assert path_to(SHAPE, -1) == []


def test_each_scored_token_sees_the_cache_its_ancestors_and_itself():
    mask = tree_attention_mask(SHAPE, start=3, device="cpu")[0, 0]  # (K+1, 3+K+1)
    assert mask.shape == (6, 9)
    assert mask[:, :3].all()
    seen = {row: mask[row, 3:].nonzero().flatten().tolist() for row in range(6)}
    # scored index 0 is the root, node i is at i+1
    assert seen == {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 1, 3, 5]}
    assert tree_positions(SHAPE, 3, "cpu").tolist() == [[3, 4, 4, 5, 5, 6]]


def test_a_chain_draft_has_no_parents_and_checks_as_before():
    draft = Draft(tokens=torch.tensor([1, 2]))
    assert not draft.is_tree and draft.parents is None
    check_draft(draft, 2, 8, "x")


def test_a_tree_draft_passes_the_checks():
    q = torch.full((5, 8), 1 / 8)
    check_draft(Draft(tokens=torch.tensor([1, 2, 3, 4, 5]), q=q, parents=SHAPE), 5, 8, "x")


@pytest.mark.parametrize("parents, detail", [
    ((-1, 0), "parents"),  # one too few
    ((-1, 1, 0), "token 1 has parent 1"),  # itself
    ((-1, 2, 0), "token 1 has parent 2"),  # a later node
    ((-2, 0, 1), "token 0 has parent -2"),
    ((-1, 0.0, 1), "token 1 has parent 0.0"),
    ([-1, 0, 1], "parents"),  # a list, not a tuple
])
def test_bad_parents_are_a_contract_error_that_names_the_token(parents, detail):
    with pytest.raises(PluginContractError, match="parents hold one int per draft token") as info:
        check_draft(Draft(tokens=torch.tensor([1, 2, 3]), parents=parents), 3, 8, "mine")
    assert detail in str(info.value)


def test_check_parents_accepts_an_empty_tree():
    check_parents((), 0, "x")


def test_a_tree_verdict_must_follow_the_tree():
    draft = Draft(tokens=torch.tensor([1, 2, 3, 4, 5]), parents=SHAPE)
    check_tree_verdict(TreeVerdict((0, 2, 4), 6), draft, 8, "x")
    check_tree_verdict(TreeVerdict((), 6), draft, 8, "x")
    for path in [(2,), (0, 4), (1, 2), (0, 9)]:
        with pytest.raises(PluginContractError, match="accepted path"):
            check_tree_verdict(TreeVerdict(path, 6), draft, 8, "x")
    with pytest.raises(PluginContractError, match="returns a specframe.TreeVerdict"):
        check_tree_verdict((0,), draft, 8, "x")


def test_a_tree_verdict_commits_only_tokens_the_target_can_produce():
    draft = Draft(tokens=torch.tensor([1, 2]), parents=(-1, -1))
    p = torch.zeros(3, 4)
    p[0, 2] = p[2, 3] = 1.0  # after the root only token 2; after node 1 (token 2) only token 3
    check_tree_verdict(TreeVerdict((1,), 3), draft, 4, "x", p=p)
    with pytest.raises(PluginContractError, match="p > 0"):
        check_tree_verdict(TreeVerdict((0,), 3), draft, 4, "x", p=p)
