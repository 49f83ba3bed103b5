"""The three pluggable parts. Subclass these (or match their methods) to write a plugin.

Parts are plain classes, usually attrs classes whose fields are their options: the registry
builds them with `cls(**options)`, so `--drafter-opt n=4` sets the field `n`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from .sampling import Sampler
    from .target import TargetModel
    from .types import Draft, RoundStats, Verdict


class Controller:
    """Decides how many tokens to draft, token by token."""

    def begin(self) -> None:
        """Called once at the start of each generation."""

    def max_draft(self) -> int:
        """The most tokens to draft this round (the engine may lower it near the length limit)."""
        raise NotImplementedError

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        """After the drafter made its `drafted`-th token (with its confidence), draft another?
        A tree drafter asks after each depth (`drafted` is then the depth reached)."""
        return True

    # Optional: `tree_width() -> int | None`, the candidates per depth a tree drafter should draft
    # this round (1 = a chain; None = no plan, the drafter keeps its own width). Asked by the
    # drafter during propose(), after max_draft(). See `thompson_cost` with max_width > 1.

    def update(self, round_stats: "RoundStats") -> None:
        """Learn from the verification outcome of the round just finished."""


class Drafter:
    """Proposes draft tokens cheaply, and the distribution q each was sampled from."""

    def before_prefill(self, target: "TargetModel", prompt_ids: list[int]) -> None:
        """Called on the reset target before it prefills the prompt: the place for
        `target.enable_split(N)`, so the prefill keeps the prompt's states at layer N."""

    def begin(self, target: "TargetModel", prompt_ids: list[int], sampler: "Sampler") -> None:
        """Called after the target has prefilled the prompt."""

    def propose(self, context: list[int], max_tokens: int, controller: Controller, sampler: "Sampler") -> "Draft":
        """Draft up to `max_tokens` tokens that follow `context` (prompt + tokens committed so far).

        After each token call `controller.keep_drafting(i, confidence)` and stop when it says no.
        Return q (K, V) built with `sampler.probs`, or q=None if the drafter is deterministic.
        A tree draft sets `Draft.parents` (K nodes, parents first; see `specframe.trees`).
        """
        raise NotImplementedError

    def rollback(self, valid_length: int) -> None:
        """Only the first `valid_length` tokens of the context are still right: forget the rest."""


class Verifier:
    """Decides which drafts to keep, from the target's distributions p.

    A verifier that also verifies tree drafts has `verify_tree(draft, p, sampler) -> TreeVerdict`
    (draft.parents set, p (K+1, V): row 0 after the last committed token, row i+1 after node i);
    the engine faults a tree draft given to a verifier without it. The built-ins have it.
    """

    lossless: ClassVar[bool] = True  # a lossy verifier must say False; the CLI then warns

    def verify(
        self, draft_tokens: "torch.Tensor", q: "torch.Tensor | None", p: "torch.Tensor", sampler: "Sampler"
    ) -> "Verdict":
        """draft_tokens (K,), q (K, V) or None (one-hot), p (K+1, V) -> Verdict."""
        raise NotImplementedError


def is_lossless(verifier) -> bool:
    """Whether a verifier keeps the target's output (its `lossless`, True when it does not say)."""
    return bool(getattr(verifier, "lossless", True))
