"""The decoding loop: draft, verify in one pass, commit, roll back, update the controller.

References: Leviathan et al. 2023 and Chen et al. 2023 (speculative sampling); Liu et al. 2024
(EESD, arXiv 2406.03853). Shapes: K drafts, V vocabulary.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Generator

import torch
from attrs import define, field

from .checks import check_draft, check_verdict, clamp_draft_budget
from .errors import PluginContractError
from .interfaces import Controller, Drafter, Verifier
from .sampling import Sampler
from .target import TargetModel
from .types import Draft, GenerationStats, RoundStats, histogram

ON_ERROR_CHOICES = ("fail", "fallback")


@define
class Parts:
    """The target and the three parts for one decoder. drafter None = plain decoding."""

    target: TargetModel
    drafter: Drafter | None
    controller: Controller
    verifier: Verifier
    names: dict[str, str] = field(factory=dict)  # kind -> registered name, for error messages


@define
class StatsRecorder:
    """Collects per-round numbers; `finish()` turns them into GenerationStats."""

    started: float = field(factory=time.perf_counter)
    drafted: list[int] = field(factory=list)
    accepted: list[int] = field(factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    new_tokens: int = 0
    fallback: str | None = None

    def add(self, round_stats: RoundStats, committed: int) -> None:
        self.drafted.append(round_stats.drafted)
        self.accepted.append(round_stats.accepted)
        self.draft_seconds += round_stats.draft_seconds
        self.verify_seconds += round_stats.verify_seconds
        self.new_tokens += committed

    def finish(self) -> GenerationStats:
        longest = max(self.drafted, default=0)
        positions = tuple(
            (sum(a > i for a in self.accepted), sum(d > i for d in self.drafted)) for i in range(longest)
        )
        return GenerationStats(
            rounds=len(self.drafted), drafted=sum(self.drafted), accepted=sum(self.accepted),
            new_tokens=self.new_tokens, draft_seconds=self.draft_seconds,
            verify_seconds=self.verify_seconds, total_seconds=time.perf_counter() - self.started,
            accepted_histogram=histogram(self.accepted), draft_length_histogram=histogram(self.drafted),
            position_accepts=positions, fallback=self.fallback,
        )


def generate_tokens(
    parts: Parts, prompt_ids: list[int], sampler: Sampler, max_new_tokens: int,
    eos_token_ids: set[int], on_error: str = "fail",
) -> Generator[list[int], None, tuple[GenerationStats, str]]:
    """Yield the tokens committed each round; return (stats, finish_reason) at the end."""
    target, recorder = parts.target, StatsRecorder()
    # 1. Prefill the prompt in one pass; the first new token comes from its last position.
    target.reset()
    first = sampler.sample(sampler.probs(target.forward(torch.tensor(prompt_ids))[-1:])[0])
    committed, finish = _commit([first], eos_token_ids, max_new_tokens)
    context = list(prompt_ids) + committed
    recorder.new_tokens += len(committed)
    yield committed
    drafter = _begin_parts(parts, context, sampler, on_error, recorder)
    while finish is None:
        remaining = max_new_tokens - (len(context) - len(prompt_ids))
        # 2. Draft up to `budget` tokens (one slot is kept for the target's own token).
        started = time.perf_counter()
        try:
            draft = _draft(parts, drafter, context, remaining - 1, sampler)
        except Exception as exc:
            drafter = _fall_back(exc, parts, context, on_error, recorder)
            draft = Draft.empty()
        drafted_at = time.perf_counter()
        # 3. Score [last token, d1..dK] with the target in one forward pass: p is (K+1, V).
        p = sampler.probs(target.forward(torch.tensor([context[-1], *draft.tokens.tolist()])))
        verdict = parts.verifier.verify(draft.tokens, draft.q, p, sampler)
        check_verdict(verdict, len(draft), target.vocab_size, parts.names.get("verifier", "verifier"))
        verified_at = time.perf_counter()
        # 4. Commit the accepted drafts plus one target token, checking EOS and length on each.
        committed, finish = _commit(
            [*draft.tokens[: verdict.accepted_length].tolist(), verdict.next_token], eos_token_ids, remaining
        )
        context += committed
        # 5. Roll back the target's and the drafter's caches to what was committed.
        _rollback(parts, drafter, len(context) - 1)
        # 6. Tell the controller what happened.
        round_stats = RoundStats(len(draft), verdict.accepted_length, draft.confidences,
                                 drafted_at - started, verified_at - drafted_at)
        if drafter is not None:
            parts.controller.update(round_stats)
        recorder.add(round_stats, len(committed))
        yield committed
    return recorder.finish(), finish


def _commit(tokens: list[int], eos_token_ids: set[int], remaining: int) -> tuple[list[int], str | None]:
    """Keep tokens up to and including the first EOS, and at most `remaining` of them."""
    kept: list[int] = []
    for token in tokens[:remaining]:
        kept.append(token)
        if token in eos_token_ids:
            return kept, "eos"
    return kept, ("length" if len(kept) >= remaining else None)


def _draft(parts: Parts, drafter: Drafter | None, context: list[int], budget: int, sampler: Sampler) -> Draft:
    if drafter is None or budget <= 0:
        return Draft.empty()
    name = parts.names.get("controller", "controller")
    budget = clamp_draft_budget(parts.controller.max_draft(), budget, name)
    if budget == 0:
        return Draft.empty()
    draft = drafter.propose(context, budget, parts.controller, sampler)
    check_draft(draft, budget, parts.target.vocab_size, parts.names.get("drafter", "drafter"))
    return draft


def _begin_parts(parts: Parts, context, sampler, on_error, recorder) -> Drafter | None:
    parts.controller.begin()
    if parts.drafter is None:
        return None
    try:
        parts.drafter.begin(parts.target, list(context[:-1]), sampler)
    except PluginContractError as exc:
        return _fall_back(exc, parts, context, on_error, recorder)
    return parts.drafter


def _rollback(parts: Parts, drafter: Drafter | None, valid_length: int) -> None:
    parts.target.rollback(valid_length)
    if drafter is not None:
        drafter.rollback(valid_length)
    cached = parts.target.cached_length()
    assert cached == valid_length, f"KV cache holds {cached} tokens but {valid_length} are committed"


def _fall_back(exc: Exception, parts: Parts, context, on_error: str, recorder: StatsRecorder) -> None:
    """With on_error='fallback', finish the generation with plain decoding; else re-raise."""
    name = parts.names.get("drafter", "drafter")
    if on_error != "fallback":
        if isinstance(exc, PluginContractError):
            raise exc
        raise PluginContractError(name, "the drafter must not raise", f"{type(exc).__name__}: {exc}") from exc
    warnings.warn(f"{exc}; finishing this generation with plain decoding", RuntimeWarning, stacklevel=3)
    recorder.fallback = str(exc)
    parts.target.rollback(len(context) - 1)
    return None
