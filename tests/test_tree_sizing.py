"""Sizing token trees from measured pass costs: what a tree round tells the controller
(`RoundStats`), the expected tokens of a fixed tree, `thompson_cost` choosing depth and width by
expected tokens per second, and early_exit following the plan through the engine (fp32 greedy
token for token; sampling exact by enumeration)."""

from __future__ import annotations

import itertools
import random

import pytest

from specframe import SpeculativeDecoder
from specframe.controllers.thompson import CostAwareThompsonController
from specframe.cost_model import best_tree_shape, expected_tokens, expected_tree_tokens
from specframe.errors import PluginContractError
from specframe.interfaces import Controller
from specframe.types import RoundStats

from .test_early_exit_tree import _plain, tiny_head_path  # noqa: F401 - a fixture

FIXED_TREE = (-1, 0, 1, -1, 0, 1)  # a chain of 3, one candidate beside each chain node (width 2)


# ---- what a tree round says -------------------------------------------------------------------
@pytest.mark.parametrize("path, first_chain, rejection", [
    ((), 0, (2, False)),  # both candidates at depth 1 rejected
    ((3,), 0, (2, True)),  # the candidate beside the chain's first draft accepted
    ((0, 1), 2, (2, False)),
    ((0, 4), 1, (2, True)),
    ((0, 1, 2), 3, None),  # the whole chain accepted
    ((0, 1, 5), 2, (2, True)),
])
def test_round_stats_of_a_tree(path, first_chain, rejection):
    stats = RoundStats(6, len(path), parents=FIXED_TREE, path=path)
    assert stats.is_tree and stats.depth == 3
    assert stats.first_choice_accepted == first_chain and stats.first_rejection() == rejection
    assert stats.all_accepted == (len(path) == 3)


def test_calibrated_thompson_bins_a_tree_round_by_its_first_chains_confidences():
    """A dynamic tree lists its nodes layer by layer; each depth is binned by its first chain's node."""
    from specframe.controllers.thompson import CalibratedThompsonController

    controller = CalibratedThompsonController(bins=2, discount=1.0)
    alpha = list(controller.posterior.alpha)
    layered = (-1, -1, 0, 0)  # depth 1: nodes 0, 1; depth 2: nodes 2, 3 (children of node 0)
    controller.update(RoundStats(4, 2, (0.9, 0.1, 0.8, 0.2), parents=layered, path=(0, 2)))
    assert controller.posterior.alpha == [alpha[0], alpha[1] + 2]  # 0.9 and 0.8, both in the upper bin


def test_round_stats_of_a_chain_are_as_before():
    assert RoundStats(4, 2).depth == 4 and RoundStats(4, 2).first_choice_accepted == 2
    assert RoundStats(4, 2).first_rejection() == (1, False) and RoundStats(4, 4).first_rejection() is None
    assert RoundStats(4, 4).all_accepted and not RoundStats(4, 3).all_accepted


# ---- the expected tokens of a fixed tree, and the best shape -------------------------------------
def _simulate_fixed_tree(theta, rescue, k, rounds=200_000, seed=0):
    rng, tokens = random.Random(seed), 0
    for _ in range(rounds):
        accepted = 0
        while accepted < k and rng.random() < theta:
            accepted += 1
        rescued = accepted < k and rng.random() < rescue
        tokens += accepted + rescued + 1
    return tokens / rounds


def test_expected_tree_tokens_matches_a_simulation():
    for theta, rescue, k in ((0.35, 0.4, 4), (0.8, 0.5, 3), (0.5, 0.0, 5)):
        assert expected_tree_tokens(theta, rescue, k) == pytest.approx(_simulate_fixed_tree(theta, rescue, k), rel=0.01)
    assert expected_tree_tokens(0.5, 0.0, 4) == expected_tokens(0.5, 4)


def test_best_shape_is_a_tree_where_verification_is_flat_and_a_chain_where_it_is_steep():
    flat = [1.0 + 0.01 * n for n in range(33)]
    steep = [1.0 + 0.5 * n for n in range(33)]
    rescues = {2: 0.3, 3: 0.45, 4: 0.55}
    k, width = best_tree_shape(0.4, rescues, 0.05, flat, 0, 8)
    assert width == 4 and k >= 2
    assert best_tree_shape(0.4, rescues, 0.05, steep, 0, 8)[1] == 1
    assert best_tree_shape(0.4, {}, 0.05, flat, 0, 8)[1] == 1  # no widths offered: a chain


# ---- thompson_cost planning trees from simulated rounds -------------------------------------------
def _fixed_tree(depth, width):
    """The shape early_exit drafts: the chain first, then width - 1 candidates per depth."""
    return (*range(-1, depth - 1), *(d - 1 for d in range(depth) for _ in range(width - 1)))


def simulate_trees(controller, rounds, theta, rescue_of, verify_cost, draft_cost=0.1, seed=1):
    """Rounds as the engine runs them with early_exit's fixed trees. Returns (tokens per second,
    widths planned)."""
    rng, tokens, seconds, widths = random.Random(seed), 0, 0.0, []
    controller.begin()
    for _ in range(rounds):
        budget, width = controller.max_draft(), controller.tree_width() or 1
        depth = 0
        while depth < max(1, budget // width) and budget:
            depth += 1
            if not controller.keep_drafting(depth, 1.0):
                break
        parents = _fixed_tree(depth, width) if width > 1 else None
        accepted = 0
        while accepted < depth and rng.random() < theta:
            accepted += 1
        path = tuple(range(accepted))
        if width > 1 and accepted < depth and rng.random() < rescue_of(width):
            path += (depth + accepted * (width - 1),)  # the first candidate beside the failed chain draft
        nodes = len(parents) if parents else depth
        cost = draft_cost * depth + verify_cost(nodes)
        controller.update(RoundStats(nodes, len(path), (), draft_cost * depth, verify_cost(nodes), parents,
                                     path if parents else ()))
        tokens, seconds = tokens + len(path) + 1, seconds + cost
        widths.append(width)
    return tokens / seconds, widths


def rescue_of(width):  # each extra candidate is right a fifth of the time where the chain failed
    return 1 - 0.8 ** (width - 1)


def test_thompson_cost_grows_trees_where_verification_is_cheap():
    flat = lambda n: 1.0 + 0.02 * n  # noqa: E731 - a GPU-like pass: 16 tokens cost 1.3 of one
    tree_rate, widths = simulate_trees(CostAwareThompsonController(max_width=4, discount=0.99), 1500, 0.4,
                                       rescue_of, flat)
    chain_rate, _ = simulate_trees(CostAwareThompsonController(discount=0.99), 1500, 0.4, rescue_of, flat)
    assert sum(w > 1 for w in widths[500:]) > 0.8 * 1000
    assert tree_rate > 1.05 * chain_rate


def test_thompson_cost_keeps_chains_where_verification_is_steep():
    steep = lambda n: 1.0 + 0.4 * n  # noqa: E731
    _, widths = simulate_trees(CostAwareThompsonController(max_width=4, discount=0.99), 1500, 0.4, rescue_of, steep)
    assert sum(w == 1 for w in widths[500:]) > 0.8 * 1000


def test_a_drafter_that_answers_a_planned_tree_with_a_chain_gets_chains_planned():
    controller = CostAwareThompsonController(max_width=4, verify_costs=(1.0, 1.0))  # flat: trees pay
    controller.max_draft()
    assert controller.tree_width() > 1
    controller.update(RoundStats(3, 1, (), 0.01, 0.05))  # a chain came back
    for _ in range(20):
        controller.max_draft()
        assert controller.tree_width() == 1


def test_with_max_width_1_thompson_cost_plans_no_tree():
    controller = CostAwareThompsonController()
    controller.max_draft()
    assert controller.tree_width() is None


# ---- through the engine -------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"max_width": 3, "verify_costs": (1.0, 1.0), "min_k": 1},
                                     {"max_width": 4, "min_k": 1}])
def test_early_exit_with_trees_sized_by_thompson_cost_is_plain_greedy(tiny_model, stub_tokenizer, registry,
                                                                     tiny_head_path, options):  # noqa: F811
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller="thompson_cost",
                                 drafter_options={"head": tiny_head_path}, controller_options=options,
                                 registry=registry)
    tree_rounds = 0
    for prompt, max_new in (([5, 9, 2, 33, 5, 9], 40), (list(range(3, 40)), 25)):
        result = decoder.generate(prompt, max_new_tokens=max_new)
        assert result.tokens == _plain(tiny_model, prompt, max_new)
        tree_rounds += result.stats.tree_rounds
    assert tree_rounds > 0


class _FakeClock:
    """time.perf_counter for the engine, advancing by a fixed step: measured costs, hence the
    controller's plans, are then the same on every replay of the enumeration."""

    def __init__(self):
        self.now = itertools.count()

    def perf_counter(self) -> float:
        return next(self.now) * 0.01


@pytest.mark.parametrize("controller, options", [
    ("thompson_cost", {"max_width": 3, "verify_costs": (1.0, 1.0), "draft_cost": 0.0}),
    ("scripted", {"lengths": (2, 4, 3), "widths": (1, 2, 3)}),
])
def test_sampling_with_planned_tree_widths_is_exactly_the_target_distribution(monkeypatch, controller, options):
    """Every draw enumerated through the engine on a 4-token toy Llama, with the tree's width chosen
    round by round from what was accepted before (the kit's scripted widths) or by thompson_cost."""
    import specframe.engine
    from specframe.plugins import PluginRegistry
    from specframe.testing import ScriptedController, autoregressive_distribution, engine_distribution
    from specframe.testing import largest_difference
    from specframe.testing.common import FLOAT32_TOLERANCE
    from specframe.types import SamplingConfig

    from .conftest import tiny_llama
    from .test_early_exit import train_tiny_head
    from .test_lossless_sampling import PROMPT

    monkeypatch.setattr(specframe.engine, "time", _FakeClock())
    toy = tiny_llama(vocab_size=4, num_layers=2, hidden_size=16, seed=3, init=0.6)
    head, _, _ = train_tiny_head(toy, layer=1, steps_epochs=2)
    registry, config = PluginRegistry(autoload=False), SamplingConfig(temperature=0.8, top_k=3)
    make = ((lambda: ScriptedController(**options)) if controller == "scripted"
            else (lambda: registry.create("controller", controller, options)))
    parts = lambda: (registry.create("drafter", "early_exit", {"head": head}), make(),  # noqa: E731
                     registry.create("verifier", "speculative", {}))
    got = engine_distribution(toy, parts, PROMPT, 4, config)
    expected = autoregressive_distribution(toy, PROMPT, 4, config)
    assert largest_difference(got, expected)[0] <= FLOAT32_TOLERANCE


class _BadWidth(Controller):
    def max_draft(self) -> int:
        return 4

    def keep_drafting(self, drafted, confidence) -> bool:
        return True

    def tree_width(self):
        return 0


def test_a_controller_planning_a_bad_width_is_a_named_fault(tiny_model, stub_tokenizer, registry,
                                                             tiny_head_path):  # noqa: F811
    from specframe.engine import Parts, generate_tokens
    from specframe.sampling import Sampler
    from specframe.target import TargetModel
    from specframe.types import SamplingConfig

    drafter = registry.create("drafter", "early_exit", {"head": tiny_head_path})
    parts = Parts(TargetModel(tiny_model), drafter, _BadWidth(), registry.create("verifier", "auto", {}),
                  {"controller": "bad_width"})
    with pytest.raises(PluginContractError, match=r"tree_width\(\) returns None or an int"):
        list(generate_tokens(parts, [5, 9, 2], Sampler(SamplingConfig()), 8, set()))
