"""Simple draft-length controllers: fixed, the transformers heuristic, and a confidence cut-off."""

from __future__ import annotations

from attrs import define, field, validators as v

from specframe.interfaces import Controller

BUILTIN_MAX_K = 64  # no built-in controller drafts more than this in one round (the engine accepts up to checks.CONTRACT_MAX_DRAFT)


@define
class FixedController(Controller):
    """Draft exactly k tokens every round."""

    k: int = field(default=4, validator=[v.instance_of(int), v.ge(1), v.le(BUILTIN_MAX_K)])

    def max_draft(self) -> int:
        return self.k


@define
class HeuristicController(Controller):
    """The schedule of transformers' assisted generation: k += 2 after a round where every draft
    was accepted, k -= 1 otherwise, never below 1 (nor above `max_k`)."""

    k: int = field(default=5, validator=[v.instance_of(int), v.ge(1), v.le(BUILTIN_MAX_K)])
    max_k: int = field(default=16, validator=[v.instance_of(int), v.ge(1), v.le(BUILTIN_MAX_K)])
    current: int = field(init=False, default=0)

    def begin(self) -> None:
        self.current = min(self.k, self.max_k)

    def max_draft(self) -> int:
        return self.current or min(self.k, self.max_k)

    def update(self, round_stats) -> None:
        if round_stats.drafted == 0:
            return
        step = 2 if round_stats.all_accepted else -1
        self.current = max(1, min(self.max_k, self.max_draft() + step))


@define
class ConfidenceController(Controller):
    """Keep drafting while the drafter's confidence (its top probability) is >= threshold,
    up to max_k tokens. Deterministic drafters report confidence 1.0."""

    threshold: float = field(default=0.4, converter=float, validator=[v.ge(0.0), v.le(1.0)])
    max_k: int = field(default=8, validator=[v.instance_of(int), v.ge(1), v.le(BUILTIN_MAX_K)])

    def max_draft(self) -> int:
        return self.max_k

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return confidence >= self.threshold
