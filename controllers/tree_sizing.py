"""How `thompson_cost` sizes a token tree: the width W beside its depth k, from measured costs.

The tree is the fixed shape of `drafters/tree_drafting.py`: a chain of k drafts and, beside each,
W - 1 other candidates (leaves). Its expected tokens are E_θ(k) + r_W (1 − θ^k)
(`cost_model.expected_tree_tokens`): θ is the chain's per-draft acceptance (the controller's
posterior), r_W the chance that one of the W - 1 candidates is accepted where the chain's draft
was rejected. r_W has its own Beta posterior per W, Beta(1, 1) at first, updated from every tree
round (`RoundStats.first_rejection`: how many candidates stood where the chain failed, and
whether one of them was accepted) and forgotten like θ. Each round draws θ and every r_W
(Thompson sampling), then picks the (k, W) with the most expected tokens per second, the round
costing c·k (the drafter runs the chain only) plus v(k·W) (one target pass over k·W + 1 tokens).

A drafter that answers a planned tree with a chain does not draft trees (most drafters): the
controller then plans chains only, as if `max_width` were 1.
"""

from __future__ import annotations

import random

from attrs import define, field

from specframe.cost_model import best_tree_shape
from specframe.types import RoundStats

from .posterior import BetaBank

RESCUE_PRIOR = (1.0, 1.0)  # Beta(α, β) of each r_W before any tree round: uniform
MAX_TREE_WIDTH = 8  # the widest tree thompson_cost plans (as early_exit drafts at most)


@define
class TreeSizer:
    """The rescue posteriors r_W (W = 2..max_width) and this round's planned width."""

    max_width: int
    rescue: BetaBank = field(init=False)
    planned_width: int = field(init=False, default=1)
    chains_only: bool = field(init=False, default=False)  # the drafter answered a planned tree with a chain

    def __attrs_post_init__(self) -> None:
        bins = max(1, self.max_width - 1)  # bin W - 2 for width W
        self.rescue = BetaBank((RESCUE_PRIOR[0],) * bins, (RESCUE_PRIOR[1],) * bins)

    @property
    def widths(self) -> range:
        return range(2, 1 if self.chains_only else self.max_width + 1)

    def plan(self, theta: float, rng: random.Random, draft_step: float, verify: list[float],
             min_k: int, max_k: int) -> tuple[int, int]:
        """(k, W) for this round under θ and a fresh draw of each r_W."""
        rescues = {width: self.rescue.sample(rng, width - 2) for width in self.widths}
        k, self.planned_width = best_tree_shape(theta, rescues, draft_step, verify, min_k, max_k)
        return k, self.planned_width

    def learn(self, round_stats: RoundStats, discount: float) -> None:
        self.rescue.decay(discount)
        if self.planned_width > 1 and not round_stats.is_tree and round_stats.drafted > 0:
            self.chains_only = True
        rejection = round_stats.first_rejection() if round_stats.is_tree else None
        if rejection is not None and 2 <= rejection[0] <= self.max_width:
            self.rescue.observe(rejection[0] - 2, rejection[1])
