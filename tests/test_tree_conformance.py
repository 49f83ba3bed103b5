"""The conformance kit checks tree drafters: q per node given its path and earlier siblings
(exactly, by enumeration), parents, the controller's stop as a depth, and rollback to an accepted
path that left the drafter's own branch. `early_exit` with width 2 and an honest toy tree
drafter pass it; a drafter reporting the parent's q for later siblings and one that rolls back
as if the chain had been accepted fail it, each on the property it breaks."""

from __future__ import annotations

import pytest

from specframe import testing
from specframe.plugins import PluginRegistry
from specframe.testing import KitSettings

from .fixtures import tree_plugins
from .test_conformance import FAST, drafter_options

TREES = PluginRegistry(autoload=False, extra_plugins=[tree_plugins])
PLUGIN = tree_plugins.__name__
Q_PROPERTY = "q is the distribution the drafts are sampled from"
ROLLBACK_PROPERTY = "rollback keeps the drafter's caches consistent"


def test_early_exit_trees_pass_the_kit(tmp_path):
    options = {**drafter_options("early_exit", tmp_path), "width": 2}
    report = testing.check_drafter("early_exit", TREES, options=options, settings=FAST)
    assert report.passed
    details = {r.check: r.detail for r in report.results}
    assert details["q_sampling"].count("draft trees, each node's q given the nodes before it") == len(FAST.samplings)
    assert details["sampling"].count("exact over") == len(FAST.samplings), details["sampling"]


def test_an_honest_toy_tree_drafter_passes_the_kit():
    report = testing.check_drafter("toy_tree", TREES, settings=FAST, width=3)
    assert report.passed and "tree drafts need a Llama-style target" in report.results[-1].detail


def test_a_tree_drafter_reporting_the_parents_q_for_later_siblings_is_caught():
    with pytest.raises(AssertionError) as caught:
        testing.check_drafter("parent_q", TREES, settings=FAST, only=("q_sampling",))
    message = str(caught.value)
    assert repr("parent_q") in message and repr(PLUGIN) in message and Q_PROPERTY in message
    assert "exact, by enumerating" in message


def test_the_node_check_alone_catches_a_wrong_sibling_row():
    """Products of rows cannot tell which node a row belongs to; the per-node check can."""
    import torch

    from specframe.testing.report import CheckFailed
    from specframe.testing.trees import check_node_conditionals

    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    drafts, rows = {}, {}
    for first in range(3):  # a root child, then a sibling drawn without replacement
        rest = q.clone()
        rest[first] = 0
        rest /= rest.sum()
        for second in (t for t in range(3) if t != first):
            key = ((first, second), (-1, -1))
            drafts[key] = float(q[first] * rest[second])
            rows[key] = torch.stack([q, rest])
    assert check_node_conditionals(drafts, rows, 1e-12) == 4  # node 0 once, node 1 after each first token
    rows[((0, 1), (-1, -1))] = torch.stack([q, q])  # the sibling's row is the parent's q
    with pytest.raises(CheckFailed, match="different q rows"):
        check_node_conditionals(drafts, rows, 1e-12)
    for key in [k for k in rows if k[0][0] == 0]:
        rows[key] = torch.stack([q, q])  # now consistently the parent's q after token 0
    with pytest.raises(CheckFailed, match="tree node 1"):
        check_node_conditionals(drafts, rows, 1e-12)


def test_a_tree_drafter_that_rolls_back_as_if_the_chain_was_accepted_is_caught():
    with pytest.raises(AssertionError) as caught:
        testing.check_drafter("stale_branch", TREES, settings=FAST, only=("rollback",))
    message = str(caught.value)
    assert repr("stale_branch") in message and ROLLBACK_PROPERTY in message and "parents" in message


def test_a_tree_drafter_that_ignores_the_controllers_stop_is_caught():
    """The controller's stop bounds a tree's depth (its nodes may be more)."""
    with pytest.raises(AssertionError) as caught:
        testing.check_drafter("deep_tree", TREES, settings=FAST, only=("contract",))
    assert "levels deep (a tree's depth) although controller.keep_drafting(1, ...) returned False" in str(caught.value)


def test_early_exit_trees_with_a_chain_drafters_rollback_are_caught(tmp_path, monkeypatch):
    """early_exit compares its head's cached tokens with the context after a tree round; trusting
    them instead (as after a chain round) keeps a rejected branch in the head's cache. Output
    stays lossless (the verifier sees to that), so only the kit's rollback check can tell."""
    import specframe.drafters.early_exit as early_exit

    monkeypatch.setattr(early_exit, "_agreement", lambda cached, committed: len(committed))  # the bug
    options = {**drafter_options("early_exit", tmp_path), "width": 2}
    with pytest.raises(AssertionError) as caught:
        testing.check_drafter("early_exit", TREES, options=options, settings=FAST, only=("rollback",))
    assert ROLLBACK_PROPERTY in str(caught.value)


def test_thompson_cost_sizing_trees_passes_the_controller_kit():
    """Its contract with tree rounds mixed in (every controller gets some), tree_width() checked."""
    report = testing.check_controller("thompson_cost", TREES, settings=FAST, max_width=4)
    assert report.passed and "600 rounds" in report.results[0].detail
