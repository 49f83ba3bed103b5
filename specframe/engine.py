"""The decoding loop: draft, verify in one pass, commit, roll back, update the controller.

References: Leviathan et al. 2023 and Chen et al. 2023 (speculative sampling); Liu et al. 2024
(EESD, arXiv 2406.03853). Shapes: K drafts, V vocabulary.

Every part's output is checked (`specframe.checks`) before it can change the text. A part that
breaks its contract or raises is a *fault*: with on_error="fail" it raises `PluginContractError`
naming the part, its plugin and the broken rule; with on_error="fallback" the generation goes on
with plain decoding (the target's own tokens, no drafter, controller or verifier) and a
`RuntimeWarning`, so the output is still exactly what plain decoding gives.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Generator

import torch
from attrs import define, field

from .checks import (check_draft, check_keep_drafting, check_tree_verdict, check_tree_width, check_verdict,
                     clamp_draft_budget)
from .errors import PluginContractError, SpecframeError
from .interfaces import Controller, Drafter, Verifier, is_lossless
from .sampling import Sampler
from .target import TargetModel
from .types import Draft, GenerationStats, RoundStats, TreeVerdict, Verdict, histogram

ON_ERROR_CHOICES = ("fail", "fallback")


@define
class Parts:
    """The target and the three parts for one decoder. drafter None = plain decoding."""

    target: TargetModel
    drafter: Drafter | None
    controller: Controller
    verifier: Verifier
    names: dict[str, str] = field(factory=dict)  # kind -> registered name, for error messages
    plugins: dict[str, str] = field(factory=dict)  # kind -> the plugin that registered it

    def who(self, kind: str) -> tuple[str, str]:
        """(plugin, part) for error messages, e.g. ("specframe.drafters", "drafter 'ngram'")."""
        name = self.names.get(kind, kind)
        return self.plugins.get(kind, name), f"{kind} {name!r}"


@define
class StatsRecorder:
    """Collects per-round numbers; `finish()` turns them into GenerationStats (also mid-generation)."""

    started: float = field(factory=time.perf_counter)
    drafted: list[int] = field(factory=list)
    accepted: list[int] = field(factory=list)
    depths: list[int] = field(factory=list)  # how deep each round drafted (= drafted for a chain)
    tree_rounds: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    new_tokens: int = 0
    fallback: str | None = None

    def add(self, round_stats: RoundStats, committed: int) -> None:
        self.drafted.append(round_stats.drafted)
        self.accepted.append(round_stats.accepted)
        self.depths.append(round_stats.depth)
        self.tree_rounds += round_stats.is_tree
        self.draft_seconds += round_stats.draft_seconds
        self.verify_seconds += round_stats.verify_seconds
        self.new_tokens += committed

    def finish(self) -> GenerationStats:
        longest = max(self.depths, default=0)
        positions = tuple(  # per depth: a tree's nodes at one depth are one position
            (sum(a > i for a in self.accepted), sum(d > i for d in self.depths)) for i in range(longest)
        )
        return GenerationStats(
            rounds=len(self.drafted), drafted=sum(self.drafted), accepted=sum(self.accepted),
            new_tokens=self.new_tokens, draft_seconds=self.draft_seconds,
            verify_seconds=self.verify_seconds, total_seconds=time.perf_counter() - self.started,
            accepted_histogram=histogram(self.accepted), draft_length_histogram=histogram(self.drafted),
            position_accepts=positions, fallback=self.fallback, tree_rounds=self.tree_rounds,
            drafted_depth=sum(self.depths),
        )


def generate_tokens(
    parts: Parts, prompt_ids: list[int], sampler: Sampler, max_new_tokens: int,
    eos_token_ids: set[int], on_error: str = "fail", recorder: StatsRecorder | None = None,
) -> Generator[list[int], None, tuple[GenerationStats, str]]:
    """Yield the tokens committed each round; return (stats, finish_reason) at the end.

    Pass a `recorder` to read the statistics so far when the generation is interrupted.
    """
    recorder = recorder if recorder is not None else StatsRecorder()
    loop = _Loop(parts, on_error, recorder)
    target = parts.target
    # 1. Prefill the prompt in one pass; the first new token comes from its last position.
    target.reset()
    loop.before_prefill(prompt_ids)
    first = sampler.sample(sampler.probs(target.forward(torch.tensor(prompt_ids), logits_to_keep=1))[0])
    committed, finish = _commit([first], eos_token_ids, max_new_tokens)
    context = list(prompt_ids) + committed
    recorder.new_tokens += len(committed)
    yield committed
    if finish is None:
        loop.begin(context, sampler)
    while finish is None:
        remaining = max_new_tokens - (len(context) - len(prompt_ids))
        # 2. Draft up to `budget` tokens (one slot is kept for the target's own token).
        started = time.perf_counter()
        draft = loop.draft(context, remaining - 1, sampler)
        drafted_at = time.perf_counter()
        # 3. Score [last token, d1..dK] with the target in one forward pass: p is (K+1, V).
        #    A tree draft is scored in one pass too (docs/architecture.md, "A tree round").
        draft, p = loop.score(context, draft, sampler)
        verdict = loop.verify(context, draft, p, sampler)
        verified_at = time.perf_counter()
        # 4. Commit the accepted drafts plus one target token, checking EOS and length on each.
        committed, finish = _commit(_accepted_tokens(draft, verdict), eos_token_ids, remaining)
        context += committed
        # 5. Roll back the target's and the drafter's caches to what was committed.
        loop.rollback(context, verdict)
        # 6. Tell the controller what happened.
        round_stats = RoundStats(len(draft), verdict.accepted_length, draft.confidences,
                                 drafted_at - started, verified_at - drafted_at, draft.parents,
                                 verdict.path if isinstance(verdict, TreeVerdict) else ())
        loop.update(context, round_stats)
        recorder.add(round_stats, len(committed))
        yield committed
    return recorder.finish(), finish


def _accepted_tokens(draft: Draft, verdict: Verdict | TreeVerdict) -> list[int]:
    """The accepted drafts (a prefix of a chain, a path of a tree) and the target's token."""
    if isinstance(verdict, TreeVerdict):
        return [*(int(draft.tokens[node]) for node in verdict.path), verdict.next_token]
    return [*draft.tokens[: verdict.accepted_length].tolist(), verdict.next_token]


def _commit(tokens: list[int], eos_token_ids: set[int], remaining: int) -> tuple[list[int], str | None]:
    """Keep tokens up to and including the first EOS, and at most `remaining` of them."""
    kept: list[int] = []
    for token in tokens[:remaining]:
        kept.append(token)
        if token in eos_token_ids:
            return kept, "eos"
    return kept, ("length" if len(kept) >= remaining else None)


@define
class _Loop:
    """One generation's parts, with every call to them guarded. `drafter` None = plain decoding."""

    parts: Parts
    on_error: str
    recorder: StatsRecorder
    drafter: Drafter | None = None

    # ---- the steps of a round ----------------------------------------------------------------
    def before_prefill(self, prompt_ids: list[int]) -> None:
        """Let the drafter set the target up (enable a split) before the prompt is prefilled."""
        hook = getattr(self.parts.drafter, "before_prefill", None)  # optional for duck-typed drafters
        if hook is None:
            return
        try:
            hook(self.parts.target, list(prompt_ids))
            if self.parts.target.length:
                plugin, part = self.parts.who("drafter")
                raise PluginContractError(plugin, "before_prefill() must not run the target's forward pass",
                                          f"the target holds {self.parts.target.length} tokens", part)
        except SpecframeError as exc:
            if not isinstance(exc, PluginContractError):
                raise  # a set-up error (not a Llama-style decoder, bad head file): the user must fix it
            self._prefill_fault(exc)
        except Exception as exc:
            self._prefill_fault(exc)

    def _prefill_fault(self, exc: Exception) -> None:
        self.fault(exc, "drafter", "before_prefill", [], scored=True)
        self.parts.target.reset()

    def begin(self, context: list[int], sampler: Sampler) -> None:
        """Start the controller and the drafter after the prompt was prefilled."""
        if self.parts.drafter is None or self.recorder.fallback is not None:
            return
        target = self.parts.target
        try:
            self.parts.controller.begin()
        except Exception as exc:
            self.fault(exc, "controller", "begin", context)
            return
        try:
            self.parts.drafter.begin(target, list(context[:-1]), sampler)
            self._check_target_untouched(context, "begin")
        except SpecframeError as exc:
            if not isinstance(exc, PluginContractError):
                raise  # a set-up error (bad head file, mismatched draft model): the user must fix it
            self.fault(exc, "drafter", "begin", context)
            return
        except Exception as exc:
            self.fault(exc, "drafter", "begin", context)
            return
        self.drafter = self.parts.drafter

    def draft(self, context: list[int], budget: int, sampler: Sampler) -> Draft:
        if self.drafter is None or budget <= 0:
            return Draft.empty()
        parts = self.parts
        plugin, part = parts.who("controller")
        try:
            budget = clamp_draft_budget(parts.controller.max_draft(), budget, plugin, part)
        except Exception as exc:
            self.fault(exc, "controller", "max_draft", context)
            return Draft.empty()
        if budget == 0:
            return Draft.empty()
        guarded = _GuardedController(parts.controller, *parts.who("controller"))
        plugin, part = parts.who("drafter")
        try:
            draft = self.drafter.propose(list(context), budget, guarded, sampler)
            self._check_target_untouched(context, "propose")
            check_draft(draft, budget, parts.target.vocab_size, plugin, part)
        except _ControllerFault as fault:
            self.fault(fault.error, "controller", "keep_drafting", context)
            return Draft.empty()
        except Exception as exc:
            self.fault(exc, "drafter", "propose", context)
            return Draft.empty()
        return draft if len(draft) or not draft.is_tree else Draft.empty()  # an empty tree is no draft

    def score(self, context: list[int], draft: Draft, sampler: Sampler) -> tuple[Draft, torch.Tensor]:
        """The target's p (K+1, V) for [last token, d1..dK], in one forward pass."""
        target = self.parts.target
        try:
            scored = torch.tensor([context[-1], *draft.tokens.tolist()])
            logits = target.forward_tree(scored, draft.parents) if draft.is_tree else target.forward(scored)
        except PluginContractError as exc:  # the drafter ran the target's lower layers on other tokens
            plugin, part = self.parts.who("drafter")
            self.fault(PluginContractError(plugin, exc.rule, exc.detail, part), "drafter", "propose", context)
            draft, logits = Draft.empty(), target.forward(torch.tensor([context[-1]]))
        return draft, sampler.probs(logits)

    def verify(self, context: list[int], draft: Draft, p: torch.Tensor, sampler: Sampler) -> Verdict:
        if not len(draft):  # nothing to verify: the target's own token, as every lossless verifier gives
            return Verdict(0, sampler.sample(p[0]))
        if draft.is_tree:
            return self._verify_tree(context, draft, p, sampler)
        verifier = self.parts.verifier
        plugin, part = self.parts.who("verifier")
        lossless = is_lossless(verifier)
        try:
            verdict = verifier.verify(draft.tokens, draft.q, p, sampler)
            check_verdict(verdict, len(draft), self.parts.target.vocab_size, plugin, part,
                          draft.tokens, p if lossless else None)
        except Exception as exc:
            self.fault(exc, "verifier", "verify", context, scored=True)
            return Verdict(0, sampler.sample(p[0]))  # p_1 does not depend on the drafts (causal)
        return Verdict(int(verdict.accepted_length), int(verdict.next_token))

    def _verify_tree(self, context: list[int], draft: Draft, p: torch.Tensor, sampler: Sampler) -> TreeVerdict:
        verifier = self.parts.verifier
        plugin, part = self.parts.who("verifier")
        try:
            verify_tree = getattr(verifier, "verify_tree", None)
            if verify_tree is None:
                raise PluginContractError(plugin, "a verifier given a tree draft has verify_tree()",
                                          f"{type(verifier).__name__} verifies chains only", part)
            verdict = verify_tree(draft, p, sampler)
            check_tree_verdict(verdict, draft, self.parts.target.vocab_size, plugin, part,
                               p=p if is_lossless(verifier) else None)
        except Exception as exc:
            self.fault(exc, "verifier", "verify_tree", context, scored=True)
            return TreeVerdict((), sampler.sample(p[0]))
        return TreeVerdict(tuple(int(node) for node in verdict.path), int(verdict.next_token))

    def rollback(self, context: list[int], verdict: Verdict | TreeVerdict | None = None) -> None:
        valid_length = len(context) - 1  # the last committed token is not yet in any cache
        target = self.parts.target
        if isinstance(verdict, TreeVerdict):  # keep the accepted path of the tree, then cut as usual
            target.keep_path(verdict.path)
        target.rollback(valid_length)
        if self.drafter is not None:
            try:
                self.drafter.rollback(valid_length)
            except Exception as exc:
                self.fault(exc, "drafter", "rollback", context)
        cached = target.cached_length()
        assert cached == valid_length, f"KV cache holds {cached} tokens but {valid_length} are committed"

    def update(self, context: list[int], round_stats: RoundStats) -> None:
        if self.drafter is None:
            return
        try:
            self.parts.controller.update(round_stats)
        except Exception as exc:
            self.fault(exc, "controller", "update", context)

    # ---- faults ------------------------------------------------------------------------------
    def _check_target_untouched(self, context: list[int], method: str) -> None:
        target = self.parts.target
        if target.length != len(context) - 1:
            plugin, part = self.parts.who("drafter")
            raise PluginContractError(
                plugin, f"{method}() must not run the target's full forward pass (use target.lower)",
                f"the target's cache went from {len(context) - 1} to {target.length} tokens", part)

    def fault(self, exc: Exception, kind: str, method: str, context: list[int], scored: bool = False) -> None:
        """With on_error='fallback', finish the generation with plain decoding; else raise.

        scored: the target already ran this round's forward pass (its cache is rolled back after
        the commit, as in any round); otherwise it is rolled back to the committed tokens now.
        """
        plugin, part = self.parts.who(kind)
        error = exc if isinstance(exc, SpecframeError) else PluginContractError(
            plugin, f"{method}() must not raise", f"{type(exc).__name__}: {exc}", part)
        if self.on_error != "fallback":
            if error is exc:
                raise exc
            raise error from exc
        warnings.warn(f"{error}; finishing this generation with plain decoding", RuntimeWarning, stacklevel=4)
        self.recorder.fallback = str(error)
        self.drafter = None
        if not scored:
            self.parts.target.rollback(len(context) - 1)


class _ControllerFault(Exception):
    """Carries a fault of the controller out of the drafter that called it."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _GuardedController:
    """What the drafter sees of the controller: keep_drafting() is checked, the rest passes through."""

    def __init__(self, controller: Controller, plugin: str, part: str):
        self._controller, self._plugin, self._part = controller, plugin, part

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return self._checked(lambda: self._controller.keep_drafting(drafted, confidence), check_keep_drafting)

    def tree_width(self) -> int | None:
        """The controller's planned tree width (`Controller.tree_width`), checked; None without a plan."""
        plan = getattr(self._controller, "tree_width", None)
        return None if plan is None else self._checked(plan, check_tree_width)

    def _checked(self, call, check):
        """`check(call())`: a raise from the controller or a broken contract becomes a controller fault."""
        try:
            answer = call()
        except Exception as exc:
            raise _ControllerFault(exc) from exc
        try:
            return check(answer, self._plugin, self._part)
        except PluginContractError as error:
            raise _ControllerFault(error) from None

    def __getattr__(self, name: str):
        return getattr(self._controller, name)
