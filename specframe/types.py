"""Value types passed between the engine and its parts. Shapes: K drafts, V vocabulary."""

from __future__ import annotations

import numbers
from collections import Counter

import torch
from attrs import field, frozen, validators as v

from .errors import ConfigError
from .trees import ROOT, children, depths


MAX_TEMPERATURE = 1e4  # sampling is uniform long before this


def is_real(value) -> bool:
    """A real number (Python or NumPy, NaN and inf included), not a bool or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    """A true integer (Python or NumPy), not a bool, a float or a tensor."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@frozen
class SamplingConfig:
    """How the target's and the drafter's logits become distributions. temperature 0 = greedy."""

    temperature: float = 0.0  # 0 means greedy (argmax); > 0 samples
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    seed: int | None = None  # seeds the torch.Generator used for every random draw

    def __attrs_post_init__(self) -> None:
        # NaN fails every comparison, so each range check is written to fail on it
        if not is_real(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.temperature > MAX_TEMPERATURE:
            raise ConfigError(f"temperature must be in [0.0, {MAX_TEMPERATURE}], got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be a number in (0, 1] (1 disables it), got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ConfigError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@frozen
class Draft:
    """What a drafter proposes in one round: a chain, or a tree when `parents` is given.

    A tree lists its nodes so that a parent comes before its children; `parents[i]` is the
    index of node i's parent, -1 for a child of the last committed token. The chain is the tree
    (-1, 0, 1, ...). For a tree, q[i] is the distribution node i was drawn from given its path
    and its earlier siblings (see docs/plugins.md, "Tree drafts").
    """

    tokens: torch.Tensor = field(eq=False, repr=False)  # (K,) int64
    q: torch.Tensor | None = field(default=None, eq=False, repr=False)  # (K, V) or None = one-hot
    confidences: tuple[float, ...] = ()  # drafter's own confidence per token (max of q)
    parents: tuple[int, ...] | None = None  # None = a chain; else one parent index per token

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    @classmethod
    def empty(cls) -> "Draft":
        return cls(tokens=torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.tokens.numel())


@frozen
class Verdict:
    """What a verifier decides: how many drafts to keep, plus the one extra target token."""

    accepted_length: int = field(validator=v.ge(0))
    next_token: int = field(validator=v.ge(0))  # correction at the first rejection, else bonus


@frozen
class TreeVerdict:
    """A verifier's decision on a tree: the accepted path (node indices, root first), plus the
    one extra target token after its last node."""

    path: tuple[int, ...]
    next_token: int = field(validator=v.ge(0))

    @property
    def accepted_length(self) -> int:
        return len(self.path)


@frozen
class RoundStats:
    """One round as the controller sees it. For a tree draft, `parents` gives its shape and `path`
    the accepted nodes; `drafted` counts every node and `accepted` the path's length."""

    drafted: int  # K, how many drafts (a tree's nodes) were verified
    accepted: int  # how many of them were kept
    confidences: tuple[float, ...] = ()
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    parents: tuple[int, ...] | None = None  # a tree's parents (see specframe.trees); None for a chain
    path: tuple[int, ...] = ()  # a tree's accepted nodes, root first (empty for a chain)

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    @property
    def depth(self) -> int:
        """How deep the draft went: K for a chain, the deepest node's depth for a tree."""
        return max(depths(self.parents), default=0) if self.is_tree else self.drafted

    @property
    def all_accepted(self) -> bool:
        """Every depth drafted was accepted (for a chain: every draft)."""
        return self.accepted == self.depth

    def first_chain(self) -> list[int]:
        """A tree's first chain: from the root, each node's first child as listed (a chain: all)."""
        if not self.is_tree:
            return list(range(self.drafted))
        below, node, chain = children(self.parents), ROOT, []
        while below[node]:
            node = below[node][0]
            chain.append(node)
        return chain

    @property
    def first_choice_accepted(self) -> int:
        """Accepted drafts along the tree's first chain (each node its parent's first child, as
        listed); for a chain, `accepted`."""
        if not self.is_tree:
            return self.accepted
        below, node, count = children(self.parents), ROOT, 0
        for accepted in self.path:
            if not below[node] or below[node][0] != accepted:
                break
            node, count = accepted, count + 1
        return count

    def first_rejection(self) -> tuple[int, bool] | None:
        """Where the first chain's first rejected draft was: (candidates at that depth, whether one
        of the others was accepted instead); None when the first chain was accepted to its end."""
        if not self.is_tree:
            return (1, False) if self.accepted < self.drafted else None
        below, kept = children(self.parents), self.first_choice_accepted
        node = self.path[kept - 1] if kept else ROOT
        if not below[node]:
            return None
        return len(below[node]), len(self.path) > kept


@frozen
class GenerationStats:
    """Statistics of one generation."""

    rounds: int
    drafted: int
    accepted: int
    new_tokens: int
    draft_seconds: float
    verify_seconds: float
    total_seconds: float
    accepted_histogram: dict[int, int] = field(factory=dict)  # accepted per round -> count
    draft_length_histogram: dict[int, int] = field(factory=dict)  # drafted per round -> count
    position_accepts: tuple[tuple[int, int], ...] = ()  # per draft position (a tree's depth): (accepted, drafted)
    fallback: str | None = None  # set when the engine fell back to plain decoding
    tree_rounds: int = 0  # rounds that drafted a tree (their `drafted` counts every node)
    drafted_depth: int = 0  # summed over rounds: how deep each drafted (= drafted when all are chains)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per round, counting the target's own token (as Spec-Bench does).

        The first new token comes from the prefill pass, which is not a round.
        """
        return (self.new_tokens - 1) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def other_seconds(self) -> float:
        return max(0.0, self.total_seconds - self.draft_seconds - self.verify_seconds)

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "new_tokens": self.new_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "draft_seconds": round(self.draft_seconds, 4),
            "verify_seconds": round(self.verify_seconds, 4),
            "other_seconds": round(self.other_seconds, 4),
            "total_seconds": round(self.total_seconds, 4),
            "accepted_histogram": {str(k): c for k, c in sorted(self.accepted_histogram.items())},
            "draft_length_histogram": {str(k): c for k, c in sorted(self.draft_length_histogram.items())},
            "position_acceptance": [a / d if d else 0.0 for a, d in self.position_accepts],
            "fallback": self.fallback,
            "tree_rounds": self.tree_rounds,
            "drafted_depth": self.drafted_depth,
        }


@frozen
class GenerationResult:
    """Tokens, text and statistics of one generation."""

    tokens: list[int]  # the new tokens only, EOS included when it was produced
    text: str
    stats: GenerationStats
    finish_reason: str  # "eos", "length" or "interrupted"


def histogram(values: list[int]) -> dict[int, int]:
    return dict(sorted(Counter(values).items()))
