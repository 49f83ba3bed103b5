"""The Beta-Bernoulli posteriors the Thompson controllers share (controllers/thompson.py)."""

from __future__ import annotations

import random

from attrs import define, field


@define
class BetaBank:
    """Independent Beta(α_b, β_b) posteriors, one per bin, each forgetting toward its prior."""

    prior_alpha: tuple[float, ...]
    prior_beta: tuple[float, ...]
    alpha: list[float] = field(init=False)
    beta: list[float] = field(init=False)

    def __attrs_post_init__(self) -> None:
        assert len(self.prior_alpha) == len(self.prior_beta), "one prior α and one prior β per bin"
        self.alpha, self.beta = list(self.prior_alpha), list(self.prior_beta)

    def decay(self, discount: float) -> None:
        """Shrink all evidence toward the prior: α ← α₀ + γ (α − α₀), likewise β."""
        for b, (alpha0, beta0) in enumerate(zip(self.prior_alpha, self.prior_beta)):
            self.alpha[b] = alpha0 + discount * (self.alpha[b] - alpha0)
            self.beta[b] = beta0 + discount * (self.beta[b] - beta0)

    def observe(self, b: int, accepted: bool) -> None:
        if accepted:
            self.alpha[b] += 1.0
        else:
            self.beta[b] += 1.0

    def mean(self, b: int = 0) -> float:
        return self.alpha[b] / (self.alpha[b] + self.beta[b])

    def sample(self, rng: random.Random, b: int = 0) -> float:
        return rng.betavariate(self.alpha[b], self.beta[b])
