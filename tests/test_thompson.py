"""Thompson-sampling controllers: exact posterior updates, forgetting, calibration bins, bounds,
option errors, simulated convergence against the analytically best draft length, and greedy
equality through the real engine on a tiny random Llama."""

from __future__ import annotations

import functools
import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st

from specframe import ConfigError, RoundStats, SpeculativeDecoder
from specframe.controllers.thompson import (
    BetaThompsonController,
    CalibratedThompsonController,
    CostAwareThompsonController,
    judged_positions,
)
from specframe.cost_model import best_length, expected_tokens
from specframe.plugins import PluginRegistry

NAMES = ("thompson", "thompson_calibrated", "thompson_cost")


# ---- a synthetic drafter and a cost model (no model involved) --------------------------------
# A CPU in fp32 as a scenario: verification over k + 1 tokens relative to one token (k = 0..7; the
# shape of the fp32 table in docs/controllers.md, "Costs"), and a draft step of 0.3 of a forward.
CPU_FP32_VERIFY_COSTS = (1.0, 1.15, 1.23, 1.60, 1.69, 1.78, 1.905, 2.03)
CPU_DRAFT_COST = 0.3


def cpu_verify_cost(k: int) -> float:
    """The scenario's table, extended by its last slope."""
    costs = CPU_FP32_VERIFY_COSTS
    return costs[k] if k < len(costs) else costs[-1] + (costs[-1] - costs[-2]) * (k - len(costs) + 1)


def simulate(controller, rounds, acceptance, draft_cost=CPU_DRAFT_COST, verify_cost=cpu_verify_cost,
             seed=1, confidence=lambda rng: 1.0, catch_up=0.0):
    """Run `rounds` rounds like the engine does: max_draft, draft while keep_drafting, accept each
    draft with probability acceptance(confidence) until the first rejection, update. A round
    that drafts after rounds without drafts pays `catch_up` more for drafting (an EESD head
    catching up on the skipped tokens). Returns (tokens per second, draft lengths)."""
    rng = random.Random(seed)
    tokens, seconds, lengths = 0, 0.0, []
    controller.begin()
    for _ in range(rounds):
        budget, confidences = controller.max_draft(), []
        while len(confidences) < budget:
            confidences.append(confidence(rng))
            if not controller.keep_drafting(len(confidences), confidences[-1]):
                break
        K = len(confidences)
        accepted = 0
        while accepted < K and rng.random() < acceptance(confidences[accepted]):
            accepted += 1
        drafting = draft_cost * K + (catch_up if K and lengths and not lengths[-1] else 0.0)
        cost = drafting + verify_cost(K)
        controller.update(RoundStats(K, accepted, tuple(confidences), drafting, verify_cost(K)))
        tokens, seconds = tokens + accepted + 1, seconds + cost
        lengths.append(K)
    return tokens / seconds, lengths


def best_fixed(rate, draft_cost=CPU_DRAFT_COST, verify_cost=cpu_verify_cost, max_k=8):
    """The analytically best fixed draft length and its expected tokens per unit time."""
    seconds = [draft_cost * k + verify_cost(k) for k in range(max_k + 1)]
    rates = [expected_tokens(rate, k) / seconds[k] for k in range(max_k + 1)]
    k = max(range(max_k + 1), key=rates.__getitem__)
    return k, rates[k]


# ---- exact posterior updates ----------------------------------------------------------------
def test_judged_positions_are_the_accepted_drafts_and_the_first_rejection():
    assert judged_positions(4, 2) == [True, True, False]
    assert judged_positions(3, 3) == [True, True, True]
    assert judged_positions(3, 0) == [False]
    assert judged_positions(0, 0) == []


def test_beta_update_counts_accepts_as_successes_and_only_the_first_rejection_as_failure():
    controller = BetaThompsonController(discount=1.0)
    controller.update(RoundStats(drafted=4, accepted=2))
    assert (controller.posterior.alpha, controller.posterior.beta) == ([3.0], [2.0])
    controller.update(RoundStats(drafted=3, accepted=3))  # all accepted: no failure
    assert (controller.posterior.alpha, controller.posterior.beta) == ([6.0], [2.0])
    controller.update(RoundStats(drafted=0, accepted=0))  # nothing drafted: nothing learned
    assert (controller.posterior.alpha, controller.posterior.beta) == ([6.0], [2.0])
    assert controller.posterior.mean() == pytest.approx(6 / 8)


def test_forgetting_shrinks_evidence_toward_the_prior_each_round():
    controller = BetaThompsonController(discount=0.5, prior_alpha=2.0, prior_beta=1.0)
    controller.update(RoundStats(4, 2))
    assert (controller.posterior.alpha, controller.posterior.beta) == ([4.0], [2.0])
    controller.update(RoundStats(3, 3))  # α = 2 + 0.5·(4 − 2) + 3, β = 1 + 0.5·(2 − 1)
    assert (controller.posterior.alpha, controller.posterior.beta) == ([6.0], [1.5])
    for _ in range(60):
        controller.update(RoundStats(0, 0))
    assert controller.posterior.alpha[0] == pytest.approx(2.0) and controller.posterior.beta[0] == pytest.approx(1.0)


def test_calibration_priors_sit_on_the_bin_midpoints():
    controller = CalibratedThompsonController(bins=4, prior_strength=2.0)
    assert controller.posterior.prior_alpha == (0.25, 0.75, 1.25, 1.75)
    assert controller.posterior.prior_beta == (1.75, 1.25, 0.75, 0.25)


def test_calibration_updates_the_bin_of_each_judged_draft():
    controller = CalibratedThompsonController(bins=4, prior_strength=2.0, discount=1.0)
    controller.update(RoundStats(drafted=4, accepted=2, confidences=(0.9, 0.6, 0.1, 0.3)))
    # 0.9 -> bin 3 accepted, 0.6 -> bin 2 accepted, 0.1 -> bin 0 rejected, 0.3 unseen
    assert controller.posterior.alpha == [0.25, 0.75, 2.25, 2.75]
    assert controller.posterior.beta == [2.75, 1.25, 0.75, 0.25]


def test_calibration_bins_the_edges_and_nan():
    controller = CalibratedThompsonController(bins=5)
    assert [controller._bin(c) for c in (0.0, 0.199, 0.2, 0.999, 1.0, 1.5, -0.1, math.nan)] == [0, 0, 1, 4, 4, 4, 0, 0]


def test_calibration_falls_back_to_the_confidences_seen_while_drafting():
    controller = CalibratedThompsonController(bins=2, discount=1.0, max_k=3)
    for drafted, confidence in enumerate((0.9, 0.2, 0.8), start=1):
        controller.keep_drafting(drafted, confidence)
    controller.update(RoundStats(drafted=3, accepted=1, confidences=()))  # drafter gave none
    prior = CalibratedThompsonController(bins=2).posterior
    assert controller.posterior.alpha == [prior.alpha[0], prior.alpha[1] + 1]  # 0.9 accepted
    assert controller.posterior.beta == [prior.beta[0] + 1, prior.beta[1]]  # 0.2 rejected
    assert controller.seen_confidences == []


# ---- bounds, reproducibility, persistence --------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(NAMES), max_k=st.integers(1, 10), seed=st.integers(0, 2**32),
       acceptance=st.floats(0.0, 1.0), discount=st.floats(0.01, 1.0))
def test_drafts_stay_within_the_cap_and_the_posterior_stays_proper(name, max_k, seed, acceptance, discount):
    cls = {"thompson": BetaThompsonController, "thompson_calibrated": CalibratedThompsonController,
           "thompson_cost": CostAwareThompsonController}[name]
    controller = cls(max_k=max_k, seed=seed, discount=discount)
    _, lengths = simulate(controller, 60, lambda c: acceptance, seed=seed, confidence=lambda rng: rng.random())
    assert all(0 <= K <= max_k for K in lengths)
    if name != "thompson_cost":
        assert min(lengths) >= 1  # the drafter always makes one token before asking
    assert all(a > 0 and b > 0 for a, b in zip(controller.posterior.alpha, controller.posterior.beta))
    assert 0 <= controller.max_draft() <= max_k
    assert not controller.keep_drafting(max_k, 1.0)


def test_cost_controller_respects_min_k():
    controller = CostAwareThompsonController(min_k=2, max_k=5)
    _, lengths = simulate(controller, 200, lambda c: 0.0)
    # never below min_k; with nothing accepted it settles there once it has tried a length or two
    assert min(lengths) == 2 and set(lengths[5:]) == {2}, lengths[:10]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_decisions_and_persist_false_restarts_each_generation(name):
    def run(**options):
        controller = PluginRegistry(autoload=False).create("controller", name, options)
        return [simulate(controller, 50, lambda c: 0.7, confidence=lambda rng: rng.random())[1] for _ in range(2)]

    first, second = run(seed=5, persist=False)
    assert first == second  # begin() restarted the posterior and the random stream
    assert run(seed=5, persist=False) == [first, second]
    carried = run(seed=5)
    assert carried[0] == first and carried[1] != first  # the posterior learned in run 1 carries over
    assert run(seed=6, persist=False)[0] != first


def test_resample_round_draws_theta_once_per_round():
    controller = BetaThompsonController(resample="round")
    controller.keep_drafting(1, 1.0)
    theta = controller.round_theta[0]
    for drafted in range(2, 5):
        controller.keep_drafting(drafted, 1.0)
    assert controller.round_theta == {0: theta}
    controller.update(RoundStats(4, 4))
    assert controller.round_theta == {}


# ---- options -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, needle", [
    ("thompson", {"discount": 0.0}, "'discount' must be a number in (0.0, 1.0]"),
    ("thompson", {"discount": 1.5}, "'discount'"),
    ("thompson", {"max_k": 0}, "'max_k' must be an integer in [1, 64]"),
    ("thompson", {"max_k": 65}, "'max_k'"),
    ("thompson", {"max_k": True}, "'max_k'"),
    ("thompson", {"prior_alpha": 0.0}, "'prior_alpha'"),
    ("thompson", {"prior_beta": -1.0}, "'prior_beta'"),
    ("thompson", {"seed": -1}, "'seed'"),
    ("thompson", {"persist": "yes"}, "'persist' must be true or false"),
    ("thompson", {"resample": "always"}, "'resample' must be one of token, round"),
    ("thompson_calibrated", {"bins": 0}, "'bins'"),
    ("thompson_calibrated", {"prior_strength": 0}, "'prior_strength'"),
    ("thompson_cost", {"min_k": 5, "max_k": 4}, "'min_k' (5) must not exceed 'max_k' (4)"),
    ("thompson_cost", {"verify_costs": (1.0, -1.0)}, "'verify_costs'"),
    ("thompson_cost", {"verify_costs": "1,x"}, "numbers separated by commas"),
    ("thompson_cost", {"draft_cost": -0.1}, "'draft_cost'"),
    ("thompson_cost", {"cost_prior_weight": 0}, "'cost_prior_weight'"),
])
def test_bad_options_fail_with_the_option_name(name, options, needle):
    cls = {"thompson": BetaThompsonController, "thompson_calibrated": CalibratedThompsonController,
           "thompson_cost": CostAwareThompsonController}[name]
    with pytest.raises(ConfigError) as error:
        cls(**options)
    assert needle in str(error.value)


def test_registry_builds_each_controller_from_command_line_strings():
    registry = PluginRegistry(autoload=False)
    assert set(NAMES) <= set(registry.names("controller"))
    controller = registry.create("controller", "thompson_cost", {
        "max_k": "6", "discount": "0.9", "persist": "false", "seed": "3", "verify_costs": "1,1.1,1.2",
    })
    assert (controller.max_k, controller.discount, controller.persist, controller.seed) == (6, 0.9, False, 3)
    assert controller.verify_costs == (1.0, 1.1, 1.2)
    with pytest.raises(ConfigError, match="'bins'"):
        registry.create("controller", "thompson_calibrated", {"bins": "0"})
    with pytest.raises(ConfigError, match="has no option 'k'"):
        registry.create("controller", "thompson", {"k": "3"})


# ---- the cost model ------------------------------------------------------------------------
def test_expected_tokens_and_best_length_match_brute_force():
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == 5.0
    seconds = [0.3 * k + cpu_verify_cost(k) for k in range(9)]
    for theta in (0.0, 0.3, 0.6, 0.8, 0.9, 0.97, 1.0):
        brute = max(range(9), key=lambda k: (expected_tokens(theta, k) / seconds[k], -k))
        assert best_length(theta, seconds) == brute
    assert best_length(0.0, seconds) == 0 and best_length(0.0, seconds, min_k=1) == 1
    assert best_length(1.0, [1.0] * 9) == 8  # free drafts, always accepted: the cap


def test_round_seconds_use_the_prior_until_measured_then_the_measurements():
    controller = CostAwareThompsonController(discount=1.0, draft_cost=CPU_DRAFT_COST,
                                             verify_costs=CPU_FP32_VERIFY_COSTS)
    prior = [CPU_DRAFT_COST * k + cpu_verify_cost(k) for k in range(9)]
    assert controller.round_seconds() == pytest.approx(prior)
    # measurements 0.05 s per relative unit: consistent with the prior's shape, so every length is
    # priced exactly, measured or not
    for K in (1, 3, 1):
        controller.update(RoundStats(K, 0, (), 0.05 * CPU_DRAFT_COST * K, 0.05 * cpu_verify_cost(K)))
    assert controller.round_seconds() == pytest.approx([0.05 * s for s in prior])
    # a length measured often converges to its measurement, whatever the prior says
    for _ in range(500):
        controller.update(RoundStats(2, 0, (), 0.05 * CPU_DRAFT_COST * 2, 0.05))
    assert controller.round_seconds()[2] == pytest.approx(0.05 * CPU_DRAFT_COST * 2 + 0.05, rel=0.01)


def test_round_seconds_without_a_table_price_untried_lengths_along_the_measured_line():
    controller = CostAwareThompsonController(discount=1.0)  # defaults: no machine assumed
    assert controller.round_seconds() == pytest.approx([1.0] * 9)  # nothing known: all alike
    for _ in range(50):  # verification measured at k = 1 and k = 5 only: v(k) = 0.04 + 0.01·k seconds
        for K in (1, 5):
            controller.update(RoundStats(K, 0, (), 0.002 * K, 0.04 + 0.01 * K))
    seconds = controller.round_seconds()
    for k in (0, 3, 8):  # untried: between the measured lengths and beyond them, on the line
        assert seconds[k] == pytest.approx(0.002 * k + 0.04 + 0.01 * k, rel=0.02), k


# ---- simulation: does it settle near the best draft length? ----------------------------------
@pytest.mark.parametrize("rate", [0.3, 0.6, 0.8, 0.95])
def test_cost_controller_settles_near_the_best_fixed_length(rate):
    best_k, best_rate = best_fixed(rate)
    throughput, lengths = simulate(CostAwareThompsonController(), 1500, lambda c: rate)
    settled = Counter(lengths[-500:])
    assert abs(settled.most_common(1)[0][0] - best_k) <= 1, (best_k, settled)
    assert sum(n for k, n in settled.items() if abs(k - best_k) <= 1) >= 0.75 * 500, (best_k, settled)
    assert throughput >= 0.95 * best_rate


def test_cost_controller_learns_costs_that_differ_from_its_prior():
    """Almost flat verification (a GPU, or bf16 with AMX) and cheap drafts: the CPU prior says
    k = 2 at θ = 0.9, the measurements say draft to the cap."""
    def verify(k):
        return 1.0 + 0.02 * k

    best_k, best_rate = best_fixed(0.9, draft_cost=0.05, verify_cost=verify)
    assert best_k == 8
    throughput, lengths = simulate(CostAwareThompsonController(), 1500, lambda c: 0.9, 0.05, verify)
    assert Counter(lengths[-500:]).most_common(1)[0][0] >= 7
    assert throughput >= 0.95 * best_rate


def test_cost_controller_charges_a_drafters_catch_up_to_the_rounds_it_skipped():
    """EESD's head catches up at its next draft on the tokens committed while it did not draft
    (k = 0). Counted as draft cost, that makes drafting look dearer after each pause, so the
    controller pauses more, near break-even, and loses to always drafting one token."""
    def verify(k):
        return 1.0 + 0.05 * k

    best_k, best_rate = best_fixed(0.3, draft_cost=0.17, verify_cost=verify)
    assert best_k == 1
    controller = CostAwareThompsonController()
    throughput, lengths = simulate(controller, 3000, lambda c: 0.3, 0.17, verify, catch_up=0.1)
    assert Counter(lengths[-1000:])[0] < 100
    assert throughput >= 0.98 * best_rate


@pytest.mark.parametrize("rate", [0.3, 0.6, 0.9])
def test_beta_ts_learns_the_rate_and_drafts_geometric_lengths(rate):
    controller = BetaThompsonController(discount=1.0)
    _, lengths = simulate(controller, 1500, lambda c: rate)
    mean = controller.posterior.mean()
    assert mean == pytest.approx(rate, abs=0.04)
    # χ is Bernoulli(posterior mean) marginally: K - 1 is a geometric run capped at max_k - 1
    expected_length = sum(mean**j for j in range(controller.max_k))
    assert sum(lengths[-500:]) / 500 == pytest.approx(expected_length, rel=0.15)


def test_cost_controller_beats_plain_beta_ts_on_cpu_costs():
    """Beta-TS ignores costs and over-drafts on this CPU; this is why thompson_cost exists."""
    beta, _ = simulate(BetaThompsonController(), 1500, lambda c: 0.6)
    cost, _ = simulate(CostAwareThompsonController(), 1500, lambda c: 0.6)
    assert cost > 1.1 * beta


def test_calibration_ts_learns_each_bins_rate_and_stops_after_doubtful_drafts():
    """An over-confident drafter: a draft with confidence c is accepted with probability c²."""
    controller = CalibratedThompsonController(bins=5, discount=1.0)
    simulate(controller, 3000, lambda c: c * c, confidence=lambda rng: rng.random())
    for b in range(5):
        true_rate = ((b + 0.5) / 5) ** 2 + 1 / 300  # E[c² | c in bin b], c uniform
        assert controller.posterior.mean(b) == pytest.approx(true_rate, abs=0.06)
    keeps = [sum(controller.keep_drafting(1, c) for _ in range(400)) for c in (0.05, 0.95)]
    assert keeps[0] < 40 < 250 < keeps[1]


# ---- end to end: lossless with the real engine ---------------------------------------------
class _Tokenizer:
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


PROMPT = [3, 4, 5, 6, 3, 4, 5]
NEW_TOKENS = 24


@functools.cache
def _tiny_llama_and_reference():
    """A 4-layer random Llama (large init so the layer-2 exit disagrees often) and its greedy output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.3, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        output = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return model, output[0, len(PROMPT):].tolist()


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 2**32), resample=st.sampled_from(("token", "round")))
def test_greedy_output_equals_plain_greedy_decoding(name, seed, resample):
    model, reference = _tiny_llama_and_reference()
    options = {"seed": seed} if name == "thompson_cost" else {"seed": seed, "resample": resample}
    decoder = SpeculativeDecoder(model, _Tokenizer(), drafter="self_exit", controller=name,
                                 drafter_options={"layer": 2}, controller_options=options,
                                 registry=PluginRegistry(autoload=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs faster on one thread, and the cores are shared
    try:
        result = decoder.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    finally:
        torch.set_num_threads(threads)
    assert result.tokens == reference
    assert result.stats.drafted >= result.stats.accepted
    assert max(result.stats.draft_length_histogram) <= decoder.parts.controller.max_k
