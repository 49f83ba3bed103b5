"""Thompson-sampling draft-length controllers, after EESD's control mechanism.

Reference: Liu, Wang, Wang, Cai, "Speculative Decoding via Early-exiting for Faster LLM
Inference with Thompson Sampling Control Mechanism", Findings of ACL 2024, arXiv 2406.03853,
Figure 2. Letters as in the paper: θ is the per-token acceptance probability, Beta(α, β) its
posterior, χ ~ Bernoulli(θ) the keep-drafting coin.

Three controllers share one Beta–Bernoulli machinery (`BetaBank`):

- `thompson` (`BetaThompsonController`, Beta-TS): one posterior. After each draft token draw
  θ ~ Beta(α, β), then χ ~ Bernoulli(θ); keep drafting while χ = 1, up to `max_k`.
- `thompson_calibrated` (`CalibratedThompsonController`, Calibration-TS): one posterior per bin
  of the drafter's confidence; θ is drawn from the bin of the token just drafted.
- `thompson_cost` (`CostAwareThompsonController`): once per round draws θ ~ Beta(α, β) and
  drafts the k that maximises expected tokens per second under that θ and the measured draft and
  verify times (they differ a lot on a CPU, see docs/controllers.md "Costs").

Choices the paper leaves open, made here (docs/controllers.md gives the full reasoning):

- What χ stands for. χ simulates the verification of the token just drafted: if that token would
  be rejected, every later draft is wasted, so stop. Under Beta-TS every position has the same θ,
  so this is the same as predicting the next token; under Calibration-TS it lets the token's own
  confidence decide. Drawing θ and then χ per token is, marginally, χ ~ Bernoulli(α / (α + β));
  `resample="round"` draws θ once per round instead (Thompson sampling in the strict sense).
  Once the posterior holds tens of observations the two behave alike (within 1 % in simulation).
- The update. Verification judges the drafts in order and stops at the first rejection. Each
  accepted draft is a success, the first rejected draft one failure. Drafts after the rejection
  are unseen: the target scored them after a wrong token, so they say nothing about θ. Drafts
  never made (the controller stopped, or the cap) are unseen too. Under the model "each position
  is accepted with probability θ, independently" this is exactly the likelihood of what was
  observed (a right-censored geometric), so the Beta update is the exact posterior. Counting the
  later positions as failures would bias θ down and make the controller draft ever shorter.
- Priors. Beta-TS: Beta(1, 1), uniform, worth two observations, so a few rounds outweigh it.
  Calibration-TS: bin b with midpoint m_b gets Beta(s·m_b, s·(1 − m_b)), s = `prior_strength`
  = 2: the prior guess is a calibrated drafter (a greedy draft whose top probability is c is
  the target's argmax with probability c), and data correct it.
- Forgetting. Before each update all evidence shrinks toward the prior by `discount` γ per
  round: α ← α₀ + γ (α − α₀), likewise β (and, in `thompson_cost`, the cost averages). γ = 0.98
  remembers about 50 rounds, roughly one 128-token answer, so the controller follows a change
  of topic or of answer (prose to code) within one generation while keeping about a hundred
  observations. It is per round, not per observation, so that `thompson_cost`, which may stop
  drafting altogether, still forgets and tries drafting again later. γ = 1 turns it off.
- Across generations. The posterior (and the random stream) persist by default
  (`persist=True`): acceptance is mostly a property of the drafter and the target, and a short
  answer should not spend its first rounds relearning it; forgetting lets each answer adapt.
  `persist=False` resets both in `begin()`, so each generation is reproducible on its own.
- The cap. `max_k = 8`. On a CPU in fp32 verifying 9 positions costs about twice a one-token
  forward, and the 9th draft adds only θ⁹ expected tokens (0.13 at θ = 0.8); with such costs the
  best fixed draft length exceeds 8 only for θ ≥ 0.95 (docs/controllers.md). At most
  BUILTIN_MAX_K (64).
- At least one draft. Beta-TS and Calibration-TS always draft one token (the drafter asks the
  controller only after drafting), as in the paper; `thompson_cost` may choose 0 (a plain
  decoding round) when no draft length pays, which the engine supports.

Randomness comes only from the controller's own `random.Random(seed)`.
"""

from __future__ import annotations

import random

from attrs import define, field

from specframe.cost_model import best_length
from specframe.errors import ConfigError
from specframe.interfaces import Controller
from specframe.types import RoundStats

from .options import int_in, is_bool, number_in, one_of, parse_costs, positive_costs
from .posterior import BetaBank
from .simple import BUILTIN_MAX_K
from .tree_sizing import MAX_TREE_WIDTH, TreeSizer

DEFAULT_MAX_K = 8
DEFAULT_DISCOUNT = 0.98
RESAMPLE_CHOICES = ("token", "round")
# The priors of thompson_cost's costs assume no machine: free drafts, and verification costs learned
# from the rounds measured (`specframe costs` measures a machine's table; docs/controllers.md, "Costs").
NEUTRAL_VERIFY_COSTS = ()  # none: v(k) is learned as a line a + b·k from the measured rounds
NEUTRAL_DRAFT_COST = 0.0


def judged_positions(drafted: int, accepted: int) -> list[bool]:
    """What verification says about each draft position, in order: True for each accepted draft,
    then False for the first rejected one if there was one. Later positions are unseen."""
    accepted = max(0, min(accepted, drafted))
    return [True] * accepted + ([False] if accepted < drafted else [])


# ---- shared base ------------------------------------------------------------------------------
@define(kw_only=True)
class ThompsonBase(Controller):
    """Options and state every Thompson controller shares. Subclasses say how many bins their
    posterior has (`_priors`) and which bin each judged draft updates (`_observations`)."""

    max_k: int = field(default=DEFAULT_MAX_K, validator=int_in(1, BUILTIN_MAX_K))  # cap per round
    discount: float = field(default=DEFAULT_DISCOUNT, validator=number_in(0.0, 1.0, low_open=True))
    persist: bool = field(default=True, validator=is_bool)  # keep the posterior across generations
    seed: int = field(default=0, validator=int_in(0, 2**63 - 1))  # seeds the controller's own RNG
    rng: random.Random = field(init=False, repr=False)
    posterior: BetaBank = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything learned: prior posterior, fresh random stream from `seed`."""
        self.rng = random.Random(self.seed)
        self.posterior = BetaBank(*self._priors())

    def _priors(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        raise NotImplementedError

    def _observations(self, round_stats: RoundStats) -> list[tuple[int, bool]]:
        """(bin, accepted?) for each judged draft position."""
        return [(0, ok) for ok in judged_positions(round_stats.depth, round_stats.accepted)]

    def begin(self) -> None:
        if not self.persist:
            self.reset()

    def max_draft(self) -> int:
        return self.max_k

    def update(self, round_stats: RoundStats) -> None:
        self.posterior.decay(self.discount)
        for b, accepted in self._observations(round_stats):
            self.posterior.observe(b, accepted)


@define(kw_only=True)
class StoppingThompson(ThompsonBase):
    """Beta-TS and Calibration-TS: after each draft, draw θ for its bin, then χ ~ Bernoulli(θ)."""

    resample: str = field(default="token", validator=one_of(RESAMPLE_CHOICES))  # when θ is drawn
    round_theta: dict[int, float] = field(init=False, factory=dict, repr=False)  # θ per bin this round

    def reset(self) -> None:
        super().reset()
        self.round_theta = {}

    def begin(self) -> None:
        super().begin()
        self.round_theta = {}  # a round cut short by the end of the last generation is over

    def _bin(self, confidence: float) -> int:
        return 0

    def theta(self, b: int) -> float:
        """θ for bin b: a fresh draw, or with resample="round" the round's draw for that bin."""
        if self.resample == "token":
            return self.posterior.sample(self.rng, b)
        if b not in self.round_theta:
            self.round_theta[b] = self.posterior.sample(self.rng, b)
        return self.round_theta[b]

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        if drafted >= self.max_k:
            return False
        return self.rng.random() < self.theta(self._bin(confidence))  # χ ~ Bernoulli(θ)

    def update(self, round_stats: RoundStats) -> None:
        super().update(round_stats)
        self.round_theta = {}


# ---- Beta-TS ----------------------------------------------------------------------------------
@define(kw_only=True)
class BetaThompsonController(StoppingThompson):
    """Beta-TS (EESD Fig. 2): one Beta(α, β) posterior over the per-token acceptance probability
    θ. After each draft token draw θ ~ Beta(α, β) and χ ~ Bernoulli(θ); draft on while χ = 1, at
    most `max_k` tokens. Accepted drafts are successes, the first rejected one a failure, later
    ones unseen; evidence decays by `discount` per round. See the module docstring for why."""

    prior_alpha: float = field(default=1.0, validator=number_in(0.0, 1e6, low_open=True))
    prior_beta: float = field(default=1.0, validator=number_in(0.0, 1e6, low_open=True))

    def _priors(self):
        return (float(self.prior_alpha),), (float(self.prior_beta),)


# ---- Calibration-TS ---------------------------------------------------------------------------
@define(kw_only=True)
class CalibratedThompsonController(StoppingThompson):
    """Calibration-TS: one Beta posterior per bin of the drafter's confidence (`bins` equal-width
    bins of [0, 1]). After each draft, θ is drawn from the bin of that draft's confidence, so a
    confident draft is likely followed by another and a doubtful one ends the round. A bin with
    midpoint m starts at Beta(s·m, s·(1 − m)), s = `prior_strength` (a calibrated drafter).

    The update uses `RoundStats.confidences`; a drafter that does not fill them is binned by the
    confidences it passed to `keep_drafting` this round. NaN confidences go to the lowest bin."""

    bins: int = field(default=10, validator=int_in(1, 1000))
    prior_strength: float = field(default=2.0, validator=number_in(0.0, 1e6, low_open=True))
    seen_confidences: list[float] = field(init=False, factory=list, repr=False)  # this round's

    def _priors(self):
        middles = [(b + 0.5) / self.bins for b in range(self.bins)]
        strength = float(self.prior_strength)
        return tuple(strength * m for m in middles), tuple(strength * (1 - m) for m in middles)

    def _bin(self, confidence: float) -> int:
        if not confidence == confidence:  # NaN
            return 0
        return min(self.bins - 1, max(0, int(confidence * self.bins)))

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        self.seen_confidences.append(float(confidence))
        return super().keep_drafting(drafted, confidence)

    def _observations(self, round_stats: RoundStats) -> list[tuple[int, bool]]:
        judged = judged_positions(round_stats.depth, round_stats.accepted)
        confidences = round_stats.confidences
        if round_stats.is_tree and len(confidences) == round_stats.drafted:  # a tree: its first chain's, per depth
            confidences = tuple(confidences[node] for node in round_stats.first_chain())
        if len(confidences) < len(judged):
            confidences = self.seen_confidences
        return [(self._bin(c), ok) for c, ok in zip(confidences, judged)]

    def begin(self) -> None:
        super().begin()
        self.seen_confidences = []

    def update(self, round_stats: RoundStats) -> None:
        super().update(round_stats)
        self.seen_confidences = []


# ---- cost-aware -------------------------------------------------------------------------------
@define(kw_only=True)
class CostAwareThompsonController(ThompsonBase):
    """Thompson sampling over the draft length, with measured costs.

    At the start of each round draw θ ~ Beta(α, β) (the same posterior and update as Beta-TS) and
    draft k = argmax E_θ(k) / T(k) over k in [min_k, max_k], where E_θ(k) = 1 + θ + … + θ^k is
    the expected tokens committed and T(k) = c·k + v(k) the round's expected seconds: c per draft
    step, v(k) for verifying k drafts. This is "keep drafting while the expected tokens per
    second would still rise", made global so a bump in v(k) cannot stop it early.

    c and v(k) are measured (`RoundStats.draft_seconds / drafted` and `verify_seconds`), forgotten
    by `discount` per round like the posterior, and shrunk toward a prior worth `cost_prior_weight`
    rounds: c toward `draft_cost` (relative to a forward; default 0) and v(k) toward a prior: by
    default a line a + b·k fitted to the measured rounds, or with `verify_costs` (relative to
    k = 0) that table's shape scaled to seconds by the measurements. So untried lengths are
    priced by the trend or the table and tried ones by their measurements. With min_k = 0 it may
    decode plainly for a while when drafting does not pay; forgetting widens the posterior again,
    and then it tries drafting anew. Engine time outside drafting and verifying is not counted.

    With `max_width` W > 1 it also sizes token trees (controllers/tree_sizing.py): it plans a
    depth k and a width w <= W per round, `max_draft()` returns the k·w nodes, `tree_width()` the
    width (drafters that draft trees, such as `early_exit`, follow it) and `keep_drafting` stops
    the chain at depth k; v is then measured per number of nodes verified. With W = 1 (the
    default) it plans chains exactly as before and `tree_width()` is None, so a tree drafter
    keeps its own width.
    """

    min_k: int = field(default=0, validator=int_in(0, BUILTIN_MAX_K))
    prior_alpha: float = field(default=1.0, validator=number_in(0.0, 1e6, low_open=True))
    prior_beta: float = field(default=1.0, validator=number_in(0.0, 1e6, low_open=True))
    draft_cost: float = field(default=NEUTRAL_DRAFT_COST, validator=number_in(0.0, 1e6))
    verify_costs: tuple[float, ...] = field(
        default=NEUTRAL_VERIFY_COSTS, converter=parse_costs, validator=positive_costs
    )
    cost_prior_weight: float = field(default=2.0, validator=number_in(0.0, 1e6, low_open=True))
    max_width: int = field(default=1, validator=int_in(1, MAX_TREE_WIDTH))  # > 1: also size token trees
    planned: int = field(init=False, default=0)  # k (the depth) chosen for the current round
    sizer: TreeSizer = field(init=False, repr=False)  # the tree width's posteriors and plan
    draft_sums: list[float] = field(init=False, repr=False)  # [seconds, tokens], discounted
    verify_sums: list[list[float]] = field(init=False, repr=False)  # per k: [seconds, rounds]
    skipped: int = field(init=False, default=0)  # rounds without drafts (k = 0) since the last draft

    def __attrs_post_init__(self) -> None:
        if self.min_k > self.max_k:
            raise ConfigError(f"option 'min_k' ({self.min_k}) must not exceed 'max_k' ({self.max_k})")
        super().__attrs_post_init__()

    def reset(self) -> None:
        super().reset()
        self.planned = self.max_k
        self.draft_sums = [0.0, 0.0]
        self.skipped = 0
        self.verify_sums = [[0.0, 0.0] for _ in range(self.max_k * self.max_width + 1)]  # per node count
        self.sizer = TreeSizer(self.max_width)

    def _priors(self):
        return (float(self.prior_alpha),), (float(self.prior_beta),)

    def prior_verify_cost(self, k: int) -> float:
        """verify_costs[k], extended past its end with its last slope (flat if one entry)."""
        costs = self.verify_costs
        if k < len(costs):
            return costs[k]
        slope = costs[-1] - costs[-2] if len(costs) > 1 else 0.0
        return max(costs[-1], costs[-1] + slope * (k - len(costs) + 1))

    def round_seconds(self) -> list[float]:
        """T(k) = c·k + v(k) for k = 0..max_k, in seconds (relative units before any measurement)."""
        per_draft, verify = self.draft_step_seconds(), self.verify_seconds()
        return [per_draft * k + verify[k] for k in range(self.max_k + 1)]

    def draft_step_seconds(self) -> float:
        """c: one draft step (one depth of a tree), measured, shrunk toward the prior."""
        weight, (seconds, steps) = self.cost_prior_weight, self.draft_sums
        return (seconds + weight * self._verify_prior()[1] * self.draft_cost) / (steps + weight)

    def verify_seconds(self) -> list[float]:
        """v(n) for n = 0..max_k·max_width drafted nodes: measured, shrunk toward the prior."""
        prior, weight = self._verify_prior()[0], self.cost_prior_weight
        return [(spent + weight * prior[n]) / (rounds + weight) for n, (spent, rounds) in enumerate(self.verify_sums)]

    def _verify_prior(self) -> tuple[list[float], float]:
        """v(k)'s prior in seconds for k = 0..max_k·max_width, and the seconds of one forward (the unit).

        With `verify_costs`, their shape scaled by the measurements; without, a line a + b·k
        (b >= 0) fitted to the measured rounds, so an untried length is priced between its
        measured neighbours or beyond them along the trend."""
        measured = [(k, spent / n, n) for k, (spent, n) in enumerate(self.verify_sums) if n > 0 and spent > 0]
        sizes = len(self.verify_sums)  # k (or a tree's nodes) = 0..max_k·max_width
        if self.verify_costs:
            units = sum(n * self.prior_verify_cost(k) for k, _, n in measured)
            scale = sum(v * n for _, v, n in measured) / units if measured else 1.0  # seconds per unit
            return [scale * self.prior_verify_cost(k) for k in range(sizes)], scale
        if not measured:
            return [1.0] * sizes, 1.0
        total = sum(n for *_, n in measured)
        mean_k = sum(k * n for k, _, n in measured) / total
        mean_v = sum(v * n for _, v, n in measured) / total
        spread = sum(n * (k - mean_k) ** 2 for k, _, n in measured)
        slope = max(0.0, sum(n * (k - mean_k) * (v - mean_v) for k, v, n in measured) / spread) if spread else 0.0
        floor = min(v for _, v, _ in measured) / 2
        line = [max(floor, mean_v + slope * (k - mean_k)) for k in range(sizes)]
        return line, line[0]

    def max_draft(self) -> int:
        theta = self.posterior.sample(self.rng)
        if self.max_width == 1:
            self.planned = best_length(theta, self.round_seconds(), self.min_k)
            return self.planned
        self.planned, width = self.sizer.plan(theta, self.rng, self.draft_step_seconds(), self.verify_seconds(),
                                              self.min_k, self.max_k)
        return self.planned * width

    def tree_width(self) -> int | None:
        """The width planned for this round's tree (1 = a chain); None with max_width = 1."""
        return None if self.max_width == 1 else self.sizer.planned_width

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return drafted < min(self.planned, self.max_k)

    def _observations(self, round_stats: RoundStats) -> list[tuple[int, bool]]:
        """θ is the chain's acceptance: a tree's first chain judged as a chain is (equal for a chain)."""
        rejected = [False] if round_stats.first_rejection() is not None else []
        return [(0, ok) for ok in [True] * round_stats.first_choice_accepted + rejected]

    def update(self, round_stats: RoundStats) -> None:
        super().update(round_stats)
        self._measure(round_stats)
        if self.max_width > 1:
            self.sizer.learn(round_stats, self.discount)

    def _measure(self, round_stats: RoundStats) -> None:
        gamma, k = self.discount, round_stats.drafted  # k: nodes verified (a chain's drafts)
        self.draft_sums = [gamma * value for value in self.draft_sums]
        self.verify_sums = [[gamma * s, gamma * n] for s, n in self.verify_sums]
        if k > 0 and round_stats.draft_seconds > 0:
            self._measure_drafting(round_stats.draft_seconds, round_stats.depth)
        self.skipped = self.skipped + 1 if k == 0 else 0
        if k < len(self.verify_sums) and round_stats.verify_seconds > 0:
            self.verify_sums[k][0] += round_stats.verify_seconds
            self.verify_sums[k][1] += 1.0

    def _measure_drafting(self, seconds: float, steps: int) -> None:
        """Add a round's draft seconds to c, less what it paid for the rounds skipped before it.

        A drafter may catch up at its next draft on the tokens committed while it did not draft
        (an EESD head runs its layer over them then). That excess over c·steps is the cost of
        the skipped rounds (k = 0), so it is charged to v(0); counted in c, it would make every
        draft look dearer after a pause and so pause drafting ever more often."""
        if self.skipped and self.draft_sums[1] > 0:
            usual = min(seconds, self.draft_step_seconds() * steps)
            self.verify_sums[0][0] += seconds - usual  # the skipped rounds were counted in verify_sums[0]
            seconds = usual
        self.draft_sums[0] += seconds
        self.draft_sums[1] += steps  # draft steps: a tree's depth

