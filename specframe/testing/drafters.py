"""`check_drafter`: the contract, that q is what the drafts are sampled from (exactly, by
enumerating the drafter's draws), rollback, and lossless decoding with the drafter; chain and
tree drafters alike (what trees add is in `specframe.testing.trees`)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import attrs
import torch

from ..checks import check_draft
from ..interfaces import Controller, Drafter
from ..plugins import PluginRegistry
from ..sampling import Sampler
from ..target import TargetModel
from ..types import Draft, SamplingConfig
from .common import (FLOAT32_TOLERANCE, KitSettings, check_distribution, check_greedy, describe, factory, generate,
                     greedy_prompt, reference_verifier, registry_or_default)
from .exact import NotEnumerable, enumerate_outcomes
from .report import CheckFailed, CheckSkipped, ConformanceReport, run_checks, single_thread
from .stats import expect_fit
from .toys import ChaosVerifier, KitController, ScriptedController, SpyDrafter, TableLM, tiny_llama
from .trees import check_node_conditionals, depth_of, describe_draft, draft_key, same_confidences


class Harness:
    """A drafter in the state the engine leaves it in at the start of a round (prompt prefilled)."""

    def __init__(self, model, drafter: Drafter, prompt: list[int], config: SamplingConfig):
        self.target, self.drafter = TargetModel(model), drafter
        self.target.reset()
        sampler = Sampler(config, device=self.target.device)
        logits = self.target.forward(torch.tensor(prompt))  # (T, V)
        self.context = [*prompt, sampler.sample(sampler.probs(logits[-1:])[0])]
        drafter.begin(self.target, list(prompt), sampler)

    def propose(self, max_tokens: int, controller: Controller, config_or_sampler) -> Draft:
        """Draft, then reject it all: roll the target and the drafter back to the committed length."""
        sampler = (config_or_sampler if isinstance(config_or_sampler, Sampler)
                   else Sampler(config_or_sampler, device=self.target.device))
        draft = self.drafter.propose(list(self.context), max_tokens, controller, sampler)
        valid = len(self.context) - 1
        self.target.rollback(valid)
        self.drafter.rollback(valid)
        return draft


def model_for(make: Callable[[], Drafter], settings: KitSettings) -> tuple[object, str]:
    """The table LM when the drafter can run on it (fast, float64, exact), else the tiny Llama
    (also for tree drafts: only a Llama-style target verifies them)."""
    table = TableLM.random(settings.vocab_size, settings.seed, min_support=2)
    try:
        with single_thread():
            harness = Harness(table, make(), greedy_prompt(table), settings.sampling)
            draft = harness.propose(settings.max_draft, KitController(settings.max_draft), settings.sampling)
        if isinstance(draft, Draft) and draft.is_tree:
            return tiny_llama(settings.vocab_size, seed=settings.seed), "tiny Llama (tree drafts need a Llama-style target)"
        return table, "table LM"
    except Exception as exc:
        llama = tiny_llama(settings.vocab_size, seed=settings.seed)
        return llama, f"tiny Llama (not the table LM: {type(exc).__name__})"


def drafter_contract(make, model, settings: KitSettings, name: str) -> str:
    """Shapes, token range, q rows, confidences, budgets and the controller's stop, greedy and sampled.
    A tree's parents are checked too, and the controller's stop bounds its depth (not its nodes)."""
    prompt = greedy_prompt(model)
    lengths = []
    for config in (SamplingConfig(0.0, seed=settings.seed), settings.sampling):
        harness = Harness(model, make(), prompt, config)
        V = harness.target.vocab_size
        for budget in (1, 2, settings.max_draft):
            draft = harness.propose(budget, KitController(budget), config)
            check_draft(draft, budget, V, name)
            lengths.append(len(draft))
        draft = harness.propose(settings.max_draft, KitController(settings.max_draft, stop_after=1), config)
        check_draft(draft, settings.max_draft, V, name)
        if depth_of(draft) > 1:
            what = "tokens" if draft.parents is None else "levels deep (a tree's depth)"
            raise CheckFailed(f"drafted {depth_of(draft)} {what} although controller.keep_drafting(1, ...) returned False")
    return f"draft lengths {lengths} for budgets (1, 2, {settings.max_draft}), greedy then sampled"


def drafter_q(make, model, settings: KitSettings, name: str) -> str:
    """At one state, P(drafts) = the product of the reported q rows, for every possible draft chain
    or tree; for a tree also each node's q given the nodes listed before it (`testing.trees`)."""
    notes = []
    for config in settings.samplings:
        try:
            notes.append(_exact_q(make, model, attrs.evolve(config, seed=settings.seed), settings, name))
        except NotEnumerable as why:
            notes.append(_sampled_q(make, model, attrs.evolve(config, seed=settings.seed), settings, name, why))
    return "; ".join(notes)


def _exact_q(make, model, config: SamplingConfig, settings: KitSettings, name: str) -> str:
    K, prompt, claimed, rows, dtypes = settings.max_draft, greedy_prompt(model), {}, {}, set()

    def run(sampler) -> tuple:
        harness = Harness(model, make(), prompt, config)  # the first token is seeded, the same each replay
        draft = harness.propose(K, KitController(K), sampler)
        check_draft(draft, K, harness.target.vocab_size, name)
        key = draft_key(draft)
        if draft.q is not None:
            dtypes.add(draft.q.dtype)
            q = draft.q.double().cpu()
            claimed[key] = float(torch.prod(q[torch.arange(len(draft)), draft.tokens.cpu()]))
            rows[key] = q
        return key

    drafted = enumerate_outcomes(run, config, settings.max_replays)
    shape = "trees" if any(parents is not None for _, parents in drafted) else "chains"
    if not claimed:  # q=None: one-hot, so the drafts must not depend on any draw
        if len(drafted) > 1:
            shown = [describe_draft(key) for key in list(drafted)[:3]]
            raise CheckFailed(f"{describe(config)}: it returned q=None (one-hot, no randomness) but drafts "
                              f"{len(drafted)} different {shape} from the same state, e.g. {shown}")
        return f"{describe(config)}: q=None, one draft {shape[:-1]}"
    tolerance = settings.tolerance if dtypes <= {torch.float64} else max(settings.tolerance, FLOAT32_TOLERANCE)
    worst = max(drafted, key=lambda t: abs(drafted[t] - claimed.get(t, 0.0)))
    if abs(drafted[worst] - claimed.get(worst, 0.0)) > tolerance:
        raise CheckFailed(f"{describe(config)}: it drafts {describe_draft(worst)} with probability "
                          f"{drafted[worst]:.10f}, but its q gives that draft {claimed.get(worst, 0.0):.10f} "
                          "(exact, by enumerating its draws)")
    if shape == "chains":
        return f"{describe(config)}: exact over {len(drafted)} draft chains"
    try:
        nodes = check_node_conditionals(drafted, rows, tolerance)
    except CheckFailed as failure:
        raise CheckFailed(f"{describe(config)}: {failure}") from None
    return f"{describe(config)}: exact over {len(drafted)} draft trees, each node's q given the nodes before it ({nodes})"


def _sampled_q(make, model, config: SamplingConfig, settings: KitSettings, name: str, why) -> str:
    """The statistical fallback: many proposals from one state against the q reported (chi-square)."""
    K = settings.max_draft
    harness = Harness(model, make(), greedy_prompt(model), config)
    V = harness.target.vocab_size
    observed = [Counter() for _ in range(K)]
    expected = [torch.zeros(V, dtype=torch.float64) for _ in range(K)]
    deterministic: Counter = Counter()
    for i in range(settings.draws):
        draft = harness.propose(K, KitController(K), attrs.evolve(config, seed=config.seed + 1 + i))
        check_draft(draft, K, V, name)
        if draft.q is None:
            deterministic[draft_key(draft)] += 1
            continue
        for position, token in enumerate(draft.tokens.tolist()):  # a tree's nodes in the order listed
            observed[position][token] += 1
            expected[position] += draft.q[position].double().cpu()
    if len(deterministic) > 1:
        shown = ", ".join(f"{describe_draft(k)} x{c}" for k, c in deterministic.most_common(3))
        raise CheckFailed(f"it returned q=None (a one-hot q, so no randomness) but drafted different tokens "
                          f"from the same state under different seeds: {shown}")
    notes = [f"q=None drafts identical over {sum(deterministic.values())} seeds"] if deterministic else []
    for position in range(K):
        if sum(observed[position].values()) >= 50:
            fit = expect_fit(f"drafted token {position + 1} against its q over {settings.draws} draws",
                             observed[position], dict(enumerate(expected[position].tolist())), settings.alpha / K)
            notes.append(f"token {position + 1}: {fit}")
    if not notes:
        raise CheckSkipped(f"drafted too little in {settings.draws} draws to test q")
    return f"{describe(config)}: sampled, not exact ({why}): " + "; ".join(notes)


def drafter_rollback(make, model, settings: KitSettings, names: dict, replays: int = 24) -> str:
    """Run a generation with random rejections (random accepted paths for a tree), then replay each
    round on a fresh drafter: the same draft (tokens and, for a tree, parents) must come back; for
    a tree also the same confidences, since a stale state rarely flips a tiny model's argmax."""
    prompt = greedy_prompt(model)
    spy = SpyDrafter(make())
    generate(TargetModel(model), spy, KitController(settings.max_draft), ChaosVerifier(random.Random(settings.seed)),
             prompt, settings.greedy_tokens, SamplingConfig(0.0, seed=settings.seed), names)
    greedy = Sampler(SamplingConfig(0.0))
    for context, budget, drafted in spy.calls[:replays]:
        target, fresh = TargetModel(model), make()
        target.reset()
        target.forward(torch.tensor(prompt))
        fresh.begin(target, list(prompt), greedy)
        if len(context) - 1 > len(prompt):
            target.forward(torch.tensor(context[len(prompt) : -1]))
        again = fresh.propose(list(context), budget, KitController(budget), greedy)
        if draft_key(again) != draft_key(drafted):
            raise CheckFailed(
                f"after the engine's rollbacks, with {len(context)} tokens committed, it drafted "
                f"{describe_draft(draft_key(drafted))}, but a fresh drafter given the same committed tokens drafts "
                f"{describe_draft(draft_key(again))}: its state kept rejected tokens"
            )
        if drafted.is_tree and not same_confidences(drafted, again):
            raise CheckFailed(
                f"after the engine's rollbacks, with {len(context)} tokens committed, it drafted "
                f"{describe_draft(draft_key(drafted))} with confidences {_rounded(drafted)}, but a fresh drafter "
                f"gives them {_rounded(again)}: its state kept a rejected branch of the tree")
    rounds = len(spy.calls)
    drafted_total = sum(len(d) for _, _, d in spy.calls)
    return f"{min(rounds, replays)} of {rounds} rounds replayed ({drafted_total} drafts, random rejections)"


def _rounded(draft: Draft) -> list[float]:
    return [round(float(c), 6) for c in draft.confidences]


def check_drafter(name: str, registry: PluginRegistry | None = None, *, options: dict | None = None,
                  settings: KitSettings | None = None, target_model=None, only: tuple[str, ...] | None = None,
                  raise_on_failure: bool = True, **more_options) -> ConformanceReport:
    """Check the drafter registered as `name`, built with `options` (and any extra keyword options).

    `target_model`: run every check on this HF causal LM instead of the toy models (for a drafter
    that needs a particular target, such as a trained early-exit head). `only`: check ids to run,
    of contract, q_sampling, rollback, greedy, sampling.
    """
    settings = settings or KitSettings()
    registry = registry_or_default(registry)
    make, plugin = factory(registry, "drafter", name, {**(options or {}), **more_options})
    names = {"drafter": name, "controller": "conformance-kit", "verifier": "auto"}
    if target_model is not None:
        sampling_model, which, llama = target_model, "the given target model", target_model
    else:
        sampling_model, which = model_for(make, settings)
        llama = tiny_llama(settings.vocab_size, seed=settings.seed)
    greedy_parts = lambda: (make(), KitController(settings.max_draft), reference_verifier())  # noqa: E731
    sampled_parts = lambda: (make(), ScriptedController(settings.schedule, widths=settings.widths),  # noqa: E731
                             reference_verifier())
    checks = [
        ("contract", "drafts keep the shape, range, q and controller contract",
         lambda: drafter_contract(make, sampling_model, settings, name)),
        ("q_sampling", "q is the distribution the drafts are sampled from",
         lambda: drafter_q(make, sampling_model, settings, name)),
        ("rollback", "rollback keeps the drafter's caches consistent",
         lambda: drafter_rollback(make, llama, settings, names)),
        ("greedy", "lossless greedy decoding", lambda: check_greedy(llama, greedy_parts, settings, names)),
        ("sampling", "lossless sampling (exact sequence distribution)",
         lambda: f"on the {which}: " + check_distribution(sampling_model, sampled_parts, settings, names)),
    ]
    report = run_checks("drafter", name, plugin, checks, only)
    return report.raise_for_failures() if raise_on_failure else report
