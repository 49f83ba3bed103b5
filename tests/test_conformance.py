"""The conformance kit (`specframe.testing`): every built-in part passes it, and deliberately
broken toy parts (tests/fixtures/broken_plugins.py: lying q, untempered q, stale or off-by-one
rollback, and speculative sampling with one classic bug each) are caught with a message that names
the part, its plugin and the property."""

from __future__ import annotations

import pytest
import torch

from attrs import define

import specframe
from specframe import testing
from specframe.checks import CONTRACT_MAX_DRAFT, clamp_draft_budget
from specframe.errors import PluginContractError
from specframe.errors import UnknownComponentError
from specframe.interfaces import Controller
from specframe.plugins import PluginRegistry
from specframe.target import TargetModel
from specframe.testing import ConformanceError, KitSettings
from specframe.types import SamplingConfig

from .fixtures import broken_plugins

FAST = KitSettings(samples=500, draws=150, length=4)  # the built-ins' full runs, kept short for the suite
BUILTINS = PluginRegistry(autoload=False)
BROKEN = PluginRegistry(autoload=False, extra_plugins=[broken_plugins])
BROKEN_PLUGIN = broken_plugins.__name__


def drafter_options(name: str, tmp_path) -> dict:
    """Options a built-in drafter needs to run on the kit's toy models."""
    if name == "draft_model":
        return {"model": testing.tiny_llama(num_layers=1, seed=1)}  # a smaller random Llama, same vocabulary
    if name == "early_exit":  # an untrained head saved for the kit's own tiny Llama
        from specframe.heads import EarlyExitHead

        head = EarlyExitHead(testing.tiny_llama(seed=FAST.seed), exit_layer=2)
        return {"head": str(head.save_pretrained(tmp_path / "head.safetensors"))}
    if name == "hybrid":
        return {"fallback": "self_exit:layer=2"}
    return {}


@pytest.mark.parametrize("name", BUILTINS.names("drafter"))
def test_builtin_drafters_pass(name, tmp_path):
    report = testing.check_drafter(name, BUILTINS, options=drafter_options(name, tmp_path), settings=FAST)
    assert report.passed and {r.check for r in report.results} == {
        "contract", "q_sampling", "rollback", "greedy", "sampling"}
    sampling = next(r for r in report.results if r.check == "sampling")
    assert sampling.detail.count("exact over") == len(FAST.samplings), sampling.detail  # nothing fell back


@pytest.mark.parametrize("name", BUILTINS.names("controller"))
def test_builtin_controllers_pass(name):
    assert testing.check_controller(name, BUILTINS, settings=FAST).passed


@pytest.mark.parametrize("name", BUILTINS.names("verifier"))
def test_builtin_verifiers_pass(name):
    greedy_only = name == "greedy"  # lossless for temperature 0 only
    report = testing.check_verifier(name, BUILTINS, settings=FAST, sampling=not greedy_only)
    skipped = {r.check for r in report.results if r.status == "skipped"}
    assert skipped == ({"rounds", "sampling"} if greedy_only else set())


def assert_caught(run, name: str, *properties: str) -> ConformanceError:
    with pytest.raises(AssertionError) as caught:
        run()
    error = caught.value
    assert isinstance(error, ConformanceError)
    message = str(error)
    assert repr(name) in message and repr(BROKEN_PLUGIN) in message
    for prop in properties:
        assert prop in message and prop in error.properties
    return error


def test_a_drafter_whose_q_is_not_what_it_samples_from_is_caught():
    error = assert_caught(lambda: testing.check_drafter("lying_q", BROKEN, settings=FAST), "lying_q",
                          "q is the distribution the drafts are sampled from")
    assert [r.check for r in error.report.failures][0] == "q_sampling"


def test_a_drafter_that_ignores_rollback_is_caught():
    assert_caught(lambda: testing.check_drafter("stale", BROKEN, settings=FAST, only=("rollback",)), "stale",
                  "rollback keeps the drafter's caches consistent")


def test_a_drafter_that_reports_an_untempered_q_is_caught_away_from_t_1():
    error = assert_caught(lambda: testing.check_drafter("untempered_q", BROKEN, settings=FAST), "untempered_q",
                          "q is the distribution the drafts are sampled from",
                          "lossless sampling (exact sequence distribution)")
    assert "exact, by enumerating" in str(error)


def test_a_drafter_whose_rollback_is_off_by_one_is_caught():
    assert_caught(lambda: testing.check_drafter("rollback_off_by_one", BROKEN, settings=FAST), "rollback_off_by_one",
                  "rollback keeps the drafter's caches consistent")


def test_a_drafter_drawing_outside_the_sampler_gets_the_statistical_tests_with_their_power():
    settings = KitSettings(samples=300, draws=150, length=4, samplings=(SamplingConfig(0.7, top_k=3),))
    report = testing.check_drafter("own_generator", BROKEN, settings=settings, only=("q_sampling", "sampling"))
    for result in report.results:
        assert "sampled, not exact" in result.detail and "power" in result.detail, result.detail


ROUNDS = "each round's committed tokens follow p exactly (drafts, corrections, bonus token)"
SAMPLING = "lossless sampling (exact sequence distribution)"


@pytest.mark.parametrize("name", sorted(broken_plugins.BROKEN_VERIFIERS))
def test_each_broken_verifier_is_caught_exactly(name):
    """Every bug is caught by the exact rounds, and all but one by the exact distribution through the
    engine too: on the kit's table, 4 new tokens happen not to show one uniform shared by a round
    (the case of tests/test_exact_engine.py does)."""
    properties = (ROUNDS,) if name == "shared_uniform" else (ROUNDS, SAMPLING)
    error = assert_caught(lambda: testing.check_verifier(name, BROKEN, settings=FAST, only=("rounds", "sampling")),
                          name, *properties)
    assert "exact, by enumerating every draw" in str(error) or "p = 0" in str(error)


def test_a_verifier_that_accepts_everything_fails_the_greedy_checks_too():
    assert_caught(lambda: testing.check_verifier("always_accept", BROKEN, settings=FAST, only=("greedy_rule", "greedy")),
                  "always_accept", "at temperature 0 it keeps drafts while they equal argmax p",
                  "lossless greedy decoding")


def test_a_controller_outside_its_bounds_is_caught():
    error = assert_caught(lambda: testing.check_controller("float_k", BROKEN, settings=FAST), "float_k",
                          "max_draft is an int in bounds, keep_drafting a bool, update takes any RoundStats")
    assert "max_draft() returns an int in [0, 1024]" in str(error) and "got 4.0 (float)" in str(error)


@define
class _LongController(Controller):
    """Always asks for k drafts: valid for the engine up to its limit, CONTRACT_MAX_DRAFT."""

    k: int = 100

    def max_draft(self) -> int:
        return self.k

    def keep_drafting(self, drafted, confidence) -> bool:
        return True


class _LongPlugin:
    @specframe.hookimpl
    def register_controllers(self, register):
        register("long_k", _LongController)


def test_the_kit_and_the_engine_agree_on_the_draft_length_limit():
    """A max_draft() the engine accepts passes the kit's contract check, one it rejects fails it."""
    registry = PluginRegistry(autoload=False, extra_plugins=[_LongPlugin()])
    for k in (100, CONTRACT_MAX_DRAFT):
        assert clamp_draft_budget(k, 5, "test") == 5
        assert testing.check_controller("long_k", registry, settings=FAST, only=("contract",), k=k).passed
    with pytest.raises(PluginContractError, match=f"max_draft\\(\\) returns an int in \\[0, {CONTRACT_MAX_DRAFT}\\]"):
        clamp_draft_budget(CONTRACT_MAX_DRAFT + 1, 5, "test")
    report = testing.check_controller("long_k", registry, settings=FAST, only=("contract",), raise_on_failure=False,
                                      k=CONTRACT_MAX_DRAFT + 1)
    assert not report.passed and f"max_draft() returns an int in [0, {CONTRACT_MAX_DRAFT}]" in str(report)
    tighter = KitSettings(samples=500, draws=150, max_draft_cap=64)  # a part can be held to less
    assert not testing.check_controller("long_k", registry, settings=tighter, only=("contract",),
                                        raise_on_failure=False).passed


def test_the_report_can_be_returned_instead_of_raised():
    report = testing.check_drafter("lying_q", BROKEN, settings=FAST, only=("contract", "q_sampling"),
                                   raise_on_failure=False)
    assert not report.passed and [r.status for r in report.results] == ["passed", "failed"]
    assert "lying_q" in str(report) and "failed 1 of 2" in report.summary()


def test_an_unknown_name_lists_what_exists():
    with pytest.raises(UnknownComponentError, match="ngram"):
        testing.check_drafter("no_such_drafter", BUILTINS)


def test_the_kit_restores_torch_threads():
    before = torch.get_num_threads()
    testing.check_controller("fixed", BUILTINS, settings=FAST, only=("contract",))
    assert torch.get_num_threads() == before


def test_chi_square_p_values():
    from collections import Counter

    fair = testing.chi_square(Counter({0: 50, 1: 50}), {0: 50.0, 1: 50.0})
    assert fair.p_value == pytest.approx(1.0)
    edge = testing.chi_square(Counter({0: 60, 1: 40}), {0: 50.0, 1: 50.0})  # statistic 4 on 1 dof
    assert edge.statistic == pytest.approx(4.0) and edge.p_value == pytest.approx(0.0455, abs=1e-3)
    impossible = testing.chi_square(Counter({0: 99, 2: 1}), {0: 50.0, 1: 50.0})
    assert impossible.p_value == 0.0 and "probability 0" in impossible.worst


def test_table_lm_reads_its_history_from_the_cache_so_rollback_matters():
    table = testing.TableLM.random(seed=3)
    target = TargetModel(table)
    ids = [1, 2, 3, 4, 5]
    full = table(torch.tensor([ids])).logits[0]  # (T, V) without a cache
    target.forward(torch.tensor(ids[:3]))
    target.forward(torch.tensor([9, 9]))  # rejected drafts
    target.rollback(3)
    assert torch.equal(target.forward(torch.tensor(ids[3:])), full[3:])


def test_autoregressive_distribution_sums_to_one():
    table = testing.TableLM.random(seed=0)
    exact = testing.autoregressive_distribution(table, [1, 2], 4, KitSettings().sampling)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12) and all(len(s) == 4 for s in exact)


def test_chi_square_power_grows_with_samples():
    few = {i: 20.0 for i in range(5)}
    many = {i: 2000.0 for i in range(5)}
    assert testing.chi_square_power(few, 1e-4) < 0.5 < testing.chi_square_power(many, 1e-4) <= 1.0
