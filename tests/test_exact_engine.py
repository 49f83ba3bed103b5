"""Whole generations through the real engine are lossless: computed exactly, not sampled.

`specframe.testing.exact` replays `specframe.engine.generate_tokens` along every branch of every
random draw (each token of a categorical draw, each side of each comparison with a uniform draw),
so the probability of every committed sequence is known exactly. On float64 table-driven targets
(V 2-6, 3-6 new tokens, chains of 1-4 drafts) it must equal plain autoregressive sampling's under
the same temperature, top-k and top-p, to 1e-9, for every built-in controller, verifier and the
drafters that run on a table, and for adversarial draft-length schedules. The verifier's own
draws, `specframe.sampling` and the engine's rollback are all on this path. Each broken part of
tests/fixtures/broken_plugins.py, and an engine whose rollback is off by one, is rejected.
(The model drafters, on a tiny Llama, are held to the same exact check by the conformance kit:
tests/test_conformance.py.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from specframe import engine
from specframe.plugins import PluginRegistry
from specframe.testing import (ScriptedController, TableDrafter, TableLM, autoregressive_distribution,
                               engine_distribution, largest_difference)
from specframe.types import SamplingConfig

from .fixtures import broken_plugins

REGISTRY = PluginRegistry(autoload=False, extra_plugins=[broken_plugins])
EXACT = 1e-9
MAX_REPLAYS = 6000
# thompson_cost is left out: its draft lengths follow measured seconds, so replays would differ
CONTROLLERS = ["scripted", "fixed", "heuristic", "confidence", "thompson", "thompson_calibrated"]
DRAFTERS = ["table", "table_argmax", "ngram"]


def drafter_table(target: TableLM, seed: int) -> TableDrafter:
    """A drafter on its own sparse table: up to 3 tokens per row, some the target cannot produce."""
    return TableDrafter(TableLM.random(target.log_probs.shape[-1], seed, max_support=3).log_probs)


def make_parts(target: TableLM, drafter: str, controller: str, verifier: str, lengths: tuple[int, ...],
               seed: int, stop_below: float | None = None):
    def parts():
        if drafter == "ngram":
            made = REGISTRY.create("drafter", "ngram", {})
        else:
            made = drafter_table(target, seed)
            made.sample = drafter == "table"
        if controller == "scripted":
            control = ScriptedController(lengths, stop_below)
        else:
            control = REGISTRY.create("controller", controller, {"k": max(lengths)} if controller == "fixed" else {})
        return made, control, REGISTRY.create("verifier", verifier, {})
    return parts


def assert_lossless(target, parts, prompt, length, config, eos=()):
    got = engine_distribution(target, parts, prompt, length, config, eos, max_replays=MAX_REPLAYS)
    expected = autoregressive_distribution(target, prompt, length, config, eos)
    difference, worst = largest_difference(got, expected)
    assert difference <= EXACT, f"{worst}: engine {got.get(worst, 0.0)!r}, target {expected.get(worst, 0.0)!r}"
    return got


@st.composite
def cases(draw):
    length = draw(st.integers(3, 6))
    V = draw(st.integers(2, 6 if length < 5 else 4))
    greedy = draw(st.integers(0, 5)) == 0
    temperature = 0.0 if greedy else draw(st.sampled_from([1.0, 0.5, 0.8, 1.3, 2.0]))
    top_k = draw(st.sampled_from([0, 2, 3])) if length < 5 else 2  # keeps long trees small
    top_p = draw(st.sampled_from([1.0, 1.0, 0.9, 0.6]))
    verifier = draw(st.sampled_from(["auto", "speculative"] + (["greedy"] if greedy else [])))
    return dict(
        V=V, length=length, config=SamplingConfig(temperature, top_k, top_p),
        seed=draw(st.integers(0, 10_000)), prompt=draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=3)),
        drafter=draw(st.sampled_from(DRAFTERS)), controller=draw(st.sampled_from(CONTROLLERS)), verifier=verifier,
        lengths=tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))),
        stop_below=draw(st.sampled_from([None, None, 0.5])),
        eos=draw(st.sampled_from([(), (), (V - 1,)])),
    )


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_whole_generations_through_the_engine_are_exactly_the_targets(case):
    target = TableLM.random(case["V"], case["seed"], max_support=3)
    parts = make_parts(target, case["drafter"], case["controller"], case["verifier"], case["lengths"],
                       case["seed"] + 1, case["stop_below"])
    assert_lossless(target, parts, case["prompt"], case["length"], case["config"], case["eos"])


class RecordingVerifier:
    """Passes verify() through to speculative sampling and records (K, accepted) of every round."""

    lossless = True

    def __init__(self, seen: set):
        self.inner, self.seen = REGISTRY.create("verifier", "speculative", {}), seen

    def verify(self, draft_tokens, q, p, sampler):
        verdict = self.inner.verify(draft_tokens, q, p, sampler)
        self.seen.add((int(draft_tokens.shape[0]), verdict.accepted_length))
        return verdict


def test_chains_of_four_with_rejections_at_every_position_are_on_the_path():
    """One fixed case that must reach K = 4, a rejection at each position and the bonus token."""
    target, seen = TableLM.random(4, 11, min_support=2, max_support=3), set()
    drafter = drafter_table(target, 12)
    schedule = (4,) + (1,) * 8  # four drafts in the first round, then one (keeps the tree small)
    parts = lambda: (TableDrafter(drafter.log_probs), ScriptedController(schedule), RecordingVerifier(seen))  # noqa: E731
    assert_lossless(target, parts, [1], 6, SamplingConfig(0.7, top_k=2))
    assert {(4, accepted) for accepted in range(5)} <= seen


def test_temperature_zero_is_plain_greedy_decoding():
    target = TableLM.random(5, 3, max_support=3)
    got = assert_lossless(target, make_parts(target, "table", "scripted", "auto", (2, 4), 4), [2], 6,
                          SamplingConfig(0.0))
    assert len(got) == 1


# ---- the same check rejects each broken part -----------------------------------------------------
BROKEN_CASE = dict(V=4, seed=7, prompt=[1, 2], length=4, config=SamplingConfig(0.7, top_k=2))  # rounds of K = 2, 1


def broken_distribution(drafter="table", verifier="speculative"):
    target = TableLM.random(BROKEN_CASE["V"], BROKEN_CASE["seed"], min_support=2, max_support=3)
    table = drafter_table(target, 6)

    def parts():
        made = TableDrafter(table.log_probs) if drafter == "table" else REGISTRY.create("drafter", drafter, {})
        return made, ScriptedController((3, 1, 2)), REGISTRY.create("verifier", verifier, {})

    got = engine_distribution(target, parts, BROKEN_CASE["prompt"], BROKEN_CASE["length"], BROKEN_CASE["config"],
                              max_replays=MAX_REPLAYS)
    expected = autoregressive_distribution(target, BROKEN_CASE["prompt"], BROKEN_CASE["length"], BROKEN_CASE["config"])
    return largest_difference(got, expected)[0]


def test_the_honest_parts_pass_the_case_the_broken_ones_fail():
    assert broken_distribution() <= EXACT


@pytest.mark.parametrize("verifier", sorted(set(broken_plugins.BROKEN_VERIFIERS) - {"always_accept", "bonus_from_q"}))
def test_each_broken_verifier_is_rejected(verifier):
    assert broken_distribution(verifier=verifier) > 1e-3, broken_plugins.BROKEN_VERIFIERS[verifier]


@pytest.mark.parametrize("verifier", ["always_accept", "bonus_from_q"])
def test_verifiers_that_commit_impossible_tokens_are_stopped_by_the_engine(verifier):
    from specframe.errors import PluginContractError

    with pytest.raises(PluginContractError, match="p > 0"):
        broken_distribution(verifier=verifier)


@pytest.mark.parametrize("drafter", ["lying_q", "untempered_q"])
def test_drafters_whose_q_is_not_what_they_sample_from_are_rejected(drafter):
    assert broken_distribution(drafter=drafter) > 1e-3


@pytest.mark.parametrize("offset", [1, -1])
def test_an_engine_whose_rollback_is_off_by_one_is_rejected(monkeypatch, offset):
    """Roll the caches back to one token too many or too few: the engine's invariants (the target
    untouched by drafting, the cache length) or the exact distribution reject it."""
    from specframe.errors import PluginContractError

    def rollback_off_by_one(self, context, verdict=None):
        valid_length = len(context) - 1 + offset  # the bug
        self.parts.target.rollback(min(valid_length, self.parts.target.length))
        if self.drafter is not None:
            self.drafter.rollback(valid_length)

    monkeypatch.setattr(engine._Loop, "rollback", rollback_off_by_one)
    with pytest.raises((PluginContractError, AssertionError)):
        assert broken_distribution() <= EXACT
