"""A faulty plugin cannot change the output.

Each fault below is one way a drafter, controller or verifier can break its contract. With
on_error="fail" the engine raises PluginContractError naming the part, its plugin and the broken
rule, and every token committed before is still plain greedy decoding's; with on_error="fallback"
it warns and finishes with plain decoding, so the whole output equals plain greedy decoding.
"""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest
import torch
from attrs import define, field

from specframe import SpeculativeDecoder, hookimpl
from specframe.errors import PluginContractError, SpecframeError
from specframe.interfaces import Controller, Drafter, Verifier
from specframe.plugins import PluginRegistry
from specframe.types import Draft, Verdict
from specframe.verifiers.speculative import AutoVerifier

PROMPT = [5, 9, 2, 33, 5, 9]
MAX_NEW = 24
FAULT_ROUND = 2  # faults strike in the third round, after two good ones
K = 3  # drafts per round
PLUGIN = "faulty_parts"  # the in-memory plugin that registers the parts below


# ---- a drafter that knows the answer, and faulty parts around it ------------------------------
@define
class OracleDrafter(Drafter):
    """Drafts the plain greedy continuation `reference` (all accepted), or from round `wrong_at` on
    each token + 1 (all rejected). With `fault`, breaks one rule in round `at`."""

    reference: list = field(factory=list)
    prompt: list = field(factory=list)
    fault: str = ""
    at: int = FAULT_ROUND
    wrong_at: int = 10**9
    rounds: int = field(default=0, init=False)
    target: object = field(default=None, init=False, repr=False)

    def before_prefill(self, target, prompt_ids) -> None:
        if self.fault == "before_prefill_raises":
            raise RuntimeError("before_prefill exploded")
        if self.fault == "before_prefill_forward":
            target.forward(torch.tensor(prompt_ids))  # the prefill is the engine's job

    def begin(self, target, prompt_ids, sampler) -> None:
        self.target, self.rounds = target, 0
        if self.fault == "begin_raises":
            raise RuntimeError("begin exploded")
        if self.fault == "lower_mismatch":
            target.enable_split(2)

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        start = len(context) - len(self.prompt)
        V = self.target.vocab_size
        tokens = []
        for token in self.reference[start : start + max_tokens]:
            tokens.append((token + 1) % V if self.rounds >= self.wrong_at else token)
            if not controller.keep_drafting(len(tokens), 1.0):
                break
        draft = Draft(torch.tensor(tokens, dtype=torch.long), None, (1.0,) * len(tokens))
        self.rounds += 1
        if self.rounds - 1 == self.at and self.fault in DRAFTER_FAULTS:
            return DRAFTER_FAULTS[self.fault](draft, V, max_tokens, self.target)
        return draft

    def rollback(self, valid_length: int) -> None:
        if self.fault == "rollback_raises" and self.rounds - 1 == self.at:
            raise OSError("rollback exploded")


def _q(draft: Draft, V: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(draft.tokens, V).float()  # (K, V), a truthful q


def _with_q(draft: Draft, q) -> Draft:
    return Draft(draft.tokens, q, draft.confidences)


def _lower_other_tokens(draft, V, max_tokens, target):
    target.enable_split(2).lower(torch.tensor([(int(t) + 1) % V for t in draft.tokens]))  # layers 1..N, other tokens
    return draft


def _full_forward(draft, V, max_tokens, target):
    target.forward(draft.tokens[:1])  # advances the target's own cache
    return draft


def _raise(exc):
    raise exc


DRAFTER_FAULTS = {  # fault -> corrupt(draft, V, max_tokens, target)
    "token_too_big": lambda d, V, m, t: Draft(torch.cat([d.tokens[:-1], torch.tensor([V])]), None, d.confidences),
    "token_negative": lambda d, V, m, t: Draft(torch.cat([torch.tensor([-1]), d.tokens[1:]]), None, d.confidences),
    "tokens_2d": lambda d, V, m, t: Draft(d.tokens[None], None, ()),
    "tokens_float": lambda d, V, m, t: Draft(d.tokens.float(), None, ()),
    "tokens_list": lambda d, V, m, t: Draft(d.tokens.tolist(), None, ()),
    "not_a_draft": lambda d, V, m, t: d.tokens,
    "too_many": lambda d, V, m, t: Draft(torch.arange(m + 1), None, ()),
    "q_shape": lambda d, V, m, t: _with_q(d, torch.full((len(d), V - 1), 1 / (V - 1))),
    "q_nan": lambda d, V, m, t: _with_q(d, _q(d, V).index_fill(1, torch.tensor([0]), math.nan)),
    "q_negative": lambda d, V, m, t: _with_q(d, _q(d, V) * 1.5 - 0.5 / V),
    "q_not_normalised": lambda d, V, m, t: _with_q(d, _q(d, V) * 2),
    "q_zero_at_draft": lambda d, V, m, t: _with_q(d, _q(d, V).roll(1, dims=1)),
    "q_integer": lambda d, V, m, t: _with_q(d, _q(d, V).long()),
    "confidence_nan": lambda d, V, m, t: Draft(d.tokens, None, (math.nan,) * len(d)),
    "confidence_count": lambda d, V, m, t: Draft(d.tokens, None, (1.0,) * (len(d) + 1)),
    "confidence_text": lambda d, V, m, t: Draft(d.tokens, None, "high"),
    "raises": lambda d, V, m, t: _raise(RuntimeError("propose exploded")),
    "raises_index_error": lambda d, V, m, t: _raise(IndexError("list index out of range")),
    "full_forward": _full_forward,
    "lower_mismatch": _lower_other_tokens,
}


@define
class FaultyController(Controller):
    """k drafts a round; breaks one rule in round `at`."""

    fault: str = ""
    at: int = FAULT_ROUND
    rounds: int = field(default=0, init=False)
    asked: int = field(default=0, init=False)

    def begin(self) -> None:
        self.rounds = 0
        if self.fault == "begin_raises":
            raise RuntimeError("begin exploded")

    def max_draft(self):
        self.asked += 1
        if self.rounds == self.at and self.fault in CONTROLLER_LENGTHS:
            return CONTROLLER_LENGTHS[self.fault]()
        return K

    def keep_drafting(self, drafted, confidence):
        if self.rounds == self.at and self.fault == "keep_drafting_raises":
            raise ZeroDivisionError("division by zero")
        if self.rounds == self.at and self.fault == "keep_drafting_not_bool":
            return "yes"
        return True

    def update(self, round_stats) -> None:
        self.rounds += 1
        if self.rounds - 1 == self.at and self.fault == "update_raises":
            raise KeyError("posterior")


CONTROLLER_LENGTHS = {  # fault -> what max_draft() returns
    "negative": lambda: -1,
    "float": lambda: 2.5,
    "bool": lambda: True,
    "huge": lambda: 10**9,
    "string": lambda: "3",
    "none": lambda: None,
    "tensor": lambda: torch.tensor(3),
    "max_draft_raises": lambda: _raise(ValueError("no estimate yet")),
}


@define
class FaultyVerifier(Verifier):
    """The auto verifier, breaking one rule in round `at` (counted in calls)."""

    fault: str = ""
    at: int = FAULT_ROUND
    calls: int = field(default=0, init=False)

    def verify(self, draft_tokens, q, p, sampler):
        verdict = AutoVerifier().verify(draft_tokens, q, p, sampler)
        self.calls += 1
        if self.calls - 1 != self.at or self.fault not in VERIFIER_FAULTS:
            return verdict
        return VERIFIER_FAULTS[self.fault](verdict, draft_tokens, p)


def _forced(accepted, token) -> Verdict:
    """A Verdict that skips its own validators, as a buggy verifier might build one."""
    verdict = Verdict(0, 0)
    object.__setattr__(verdict, "accepted_length", accepted)
    object.__setattr__(verdict, "next_token", token)
    return verdict


VERIFIER_FAULTS = {  # fault -> corrupt(verdict, draft_tokens, p)
    "accepts_too_many": lambda v, d, p: Verdict(len(d) + 1, v.next_token),
    "accepts_negative": lambda v, d, p: _forced(-1, v.next_token),
    "accepts_float": lambda v, d, p: _forced(1.0, v.next_token),
    "accepts_tensor": lambda v, d, p: _forced(torch.tensor(1), v.next_token),
    "next_too_big": lambda v, d, p: Verdict(v.accepted_length, p.shape[-1]),
    "next_negative": lambda v, d, p: _forced(v.accepted_length, -3),
    "next_float": lambda v, d, p: _forced(v.accepted_length, float(v.next_token)),
    "next_wrong": lambda v, d, p: Verdict(v.accepted_length, (v.next_token + 1) % p.shape[-1]),
    "accepts_rejected_drafts": lambda v, d, p: Verdict(len(d), int(p[len(d)].argmax())),
    "not_a_verdict": lambda v, d, p: (v.accepted_length, v.next_token),
    "raises": lambda v, d, p: _raise(RuntimeError("verify exploded")),
    "builds_bad_verdict": lambda v, d, p: Verdict(v.accepted_length, -1),  # its validator raises
}


def _plugin() -> types.ModuleType:
    """An in-memory plugin module registering the three faulty parts."""
    module = types.ModuleType(PLUGIN)
    module.register_drafters = hookimpl(lambda register: register("faulty_drafter", OracleDrafter))
    module.register_controllers = hookimpl(lambda register: register("faulty_controller", FaultyController))
    module.register_verifiers = hookimpl(lambda register: register("faulty_verifier", FaultyVerifier))
    return module


@pytest.fixture(scope="module")
def faulty_registry() -> PluginRegistry:
    return PluginRegistry(autoload=False, extra_plugins=[_plugin()])


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[int]:
    """Plain greedy decoding by Hugging Face generate: what every run below must give."""
    out = tiny_model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_NEW, do_sample=False,
                              min_new_tokens=MAX_NEW)
    return out[0, len(PROMPT):].tolist()


# kind, fault, a piece of the rule the error must name, extra drafter options
CASES = (
    [("drafter", f, r, {}) for f, r in [
        ("token_too_big", "draft tokens lie in [0, 64)"), ("token_negative", "draft tokens lie in [0, 64)"),
        ("tokens_2d", "1-D int64"), ("tokens_float", "1-D int64"), ("tokens_list", "1-D int64"),
        ("not_a_draft", "returns a specframe.Draft"), ("too_many", "at most max_tokens drafts"),
        ("q_shape", "shape (K, V)"), ("q_nan", "finite, non-negative"), ("q_negative", "finite, non-negative"),
        ("q_not_normalised", "sums to 1"), ("q_zero_at_draft", "q > 0"), ("q_integer", "float tensor"),
        ("confidence_nan", "confidences"), ("confidence_count", "confidences"), ("confidence_text", "confidences"),
        ("raises", "propose() must not raise"), ("raises_index_error", "propose() must not raise"),
        ("full_forward", "must not run the target's full forward pass"),
        ("lower_mismatch", "extend the drafted lower-layer prefix"),
        ("begin_raises", "begin() must not raise"), ("rollback_raises", "rollback() must not raise"),
        ("before_prefill_raises", "before_prefill() must not raise"),
        ("before_prefill_forward", "before_prefill() must not run the target's forward pass"),
    ]]
    + [("controller", f, r, {}) for f, r in [
        ("negative", "max_draft() returns an int in [0, 1024]"), ("float", "max_draft() returns an int"),
        ("bool", "max_draft() returns an int"), ("huge", "max_draft() returns an int"),
        ("string", "max_draft() returns an int"), ("none", "max_draft() returns an int"),
        ("tensor", "max_draft() returns an int"), ("max_draft_raises", "max_draft() must not raise"),
        ("keep_drafting_raises", "keep_drafting() must not raise"), ("keep_drafting_not_bool", "returns a bool"),
        ("update_raises", "update() must not raise"), ("begin_raises", "begin() must not raise"),
    ]]
    + [("verifier", f, r, o) for f, r, o in [
        ("accepts_too_many", "accept at most the drafted tokens", {}),
        ("accepts_negative", "accept at most the drafted tokens", {}),
        ("accepts_float", "accept at most the drafted tokens", {}),
        ("accepts_tensor", "accept at most the drafted tokens", {}),
        ("next_too_big", "next token is an int in [0, 64)", {}),
        ("next_negative", "next token is an int in [0, 64)", {}),
        ("next_float", "next token is an int", {}),
        ("next_wrong", "commits only tokens the target can produce", {}),
        ("accepts_rejected_drafts", "commits only tokens the target can produce", {"wrong_at": FAULT_ROUND}),
        ("not_a_verdict", "returns a specframe.Verdict", {}),
        ("raises", "verify() must not raise", {}),
        ("builds_bad_verdict", "verify() must not raise", {}),
    ]]
)
IDS = [f"{kind}-{fault}" for kind, fault, _, _ in CASES]


def _decoder(model, tokenizer, registry, reference, kind, fault, options, on_error):
    drafter_options = {"reference": reference, "prompt": PROMPT, **options}
    parts = {"drafter": drafter_options, "controller": {}, "verifier": {}}
    parts[kind] = {**parts[kind], "fault": fault}
    return SpeculativeDecoder(
        model, tokenizer, drafter="faulty_drafter", controller="faulty_controller", verifier="faulty_verifier",
        drafter_options=parts["drafter"], controller_options=parts["controller"],
        verifier_options=parts["verifier"], on_error=on_error, registry=registry,
    )


@pytest.mark.parametrize("kind,fault,rule,options", CASES, ids=IDS)
def test_fault_is_a_contract_error_naming_part_plugin_and_rule(
        kind, fault, rule, options, tiny_model, stub_tokenizer, faulty_registry, reference):
    decoder = _decoder(tiny_model, stub_tokenizer, faulty_registry, reference, kind, fault, options, "fail")
    with pytest.raises(PluginContractError) as info:
        decoder.generate(PROMPT, max_new_tokens=MAX_NEW)
    error = info.value
    assert error.plugin == PLUGIN and error.part == f"{kind} 'faulty_{kind}'", str(error)
    assert rule in error.rule, str(error)
    assert f"{kind} 'faulty_{kind}' of plugin '{PLUGIN}' broke the rule" in str(error)
    partial = decoder.last_result.tokens  # what was committed before the fault was caught
    assert partial == reference[: len(partial)] and len(partial) < MAX_NEW
    assert decoder.last_result.finish_reason == "error"


@pytest.mark.parametrize("kind,fault,rule,options", CASES, ids=IDS)
def test_fallback_finishes_with_plain_decoding(
        kind, fault, rule, options, tiny_model, stub_tokenizer, faulty_registry, reference):
    decoder = _decoder(tiny_model, stub_tokenizer, faulty_registry, reference, kind, fault, options, "fallback")
    with pytest.warns(RuntimeWarning, match=f"{kind} 'faulty_{kind}'.*finishing this generation with plain decoding"):
        result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert result.tokens == reference
    assert result.finish_reason == "length" and rule in result.stats.fallback


def test_the_oracle_without_faults_is_accepted_in_full(tiny_model, stub_tokenizer, faulty_registry, reference):
    """The harness itself: no fault, no warning, every draft accepted."""
    decoder = _decoder(tiny_model, stub_tokenizer, faulty_registry, reference, "drafter", "", {}, "fail")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = decoder.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert result.tokens == reference and result.stats.acceptance_rate == 1.0
    assert result.stats.fallback is None


def test_numpy_integers_from_a_controller_are_fine(tiny_model, stub_tokenizer, faulty_registry, reference):
    CONTROLLER_LENGTHS["numpy"] = lambda: np.int64(2)
    try:
        decoder = _decoder(tiny_model, stub_tokenizer, faulty_registry, reference, "controller", "numpy", {}, "fail")
        assert decoder.generate(PROMPT, max_new_tokens=MAX_NEW).tokens == reference
    finally:
        del CONTROLLER_LENGTHS["numpy"]


@pytest.mark.parametrize("fault", ["q_nan", "raises", "too_many"])
def test_faults_under_sampling(fault, tiny_model, stub_tokenizer, faulty_registry, reference):
    """At temperature > 0 the same faults are caught, and a fallback still finishes the generation."""
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=0.8, top_k=20, seed=3)
    decoder = _decoder(tiny_model, stub_tokenizer, faulty_registry, reference, "drafter", fault, {}, "fail")
    with pytest.raises(PluginContractError):
        decoder.generate(PROMPT, **kwargs)
    decoder = _decoder(tiny_model, stub_tokenizer, faulty_registry, reference, "drafter", fault, {}, "fallback")
    with pytest.warns(RuntimeWarning):
        result = decoder.generate(PROMPT, **kwargs)
    assert len(result.tokens) == MAX_NEW and all(0 <= t < 64 for t in result.tokens)


def test_a_setup_error_in_begin_is_not_swallowed_by_fallback(tiny_model, stub_tokenizer, registry):
    """A drafter whose begin() reports a set-up problem (here: no head ships for this model)
    raises that error even with on_error='fallback': there is nothing to fall back from yet."""
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller="fixed",
                                 on_error="fallback", registry=registry)
    with pytest.raises(SpecframeError, match="no early-exit head ships for this model"):
        decoder.generate(PROMPT, max_new_tokens=4)


def test_plain_decoding_never_calls_the_verifier(tiny_model, stub_tokenizer, faulty_registry, reference):
    """With no drafter, a broken verifier cannot matter: there is nothing for it to verify."""
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="none", controller="faulty_controller",
                                 verifier="faulty_verifier", verifier_options={"fault": "raises", "at": 0},
                                 registry=faulty_registry)
    assert decoder.generate(PROMPT, max_new_tokens=MAX_NEW).tokens == reference
