"""Untrained early exit: the target's first N layers, then its own final norm and LM head.

The same idea as transformers' `assistant_early_exit`, kept as a baseline for EESD. The lower
layers' KV cache is shared with verification (see `TargetModel.enable_split`).
"""

from __future__ import annotations

import torch
from attrs import define, field, validators as v

from specframe.interfaces import Drafter
from specframe.types import Draft


def draft_with(step, first_token: int, max_tokens: int, controller, sampler) -> Draft:
    """Run `step(token) -> (V,) logits` autoregressively, asking the controller after each token.

    Shared by drafters that draft one token per call. Returns tokens (K,) and q (K, V).
    """
    tokens, q_rows, confidences = [], [], []
    token = first_token
    while len(tokens) < max_tokens:
        logits = step(token)  # (V,)
        if sampler.greedy:  # q is one-hot and not kept: the argmax without building it (a third of the time)
            token = int(logits.max(-1).indices)  # the first maximum, as argmax
            confidence = float(torch.softmax(logits.float(), -1).max())
        else:
            q_i = sampler.probs(logits[None])[0]  # (V,)
            token = sampler.sample(q_i)
            confidence = float(q_i.max())
            q_rows.append(q_i)
        tokens.append(token)
        confidences.append(confidence)
        if not controller.keep_drafting(len(tokens), confidence):
            break
    if not tokens:
        return Draft.empty()
    q = None if sampler.greedy else torch.stack(q_rows)
    return Draft(torch.tensor(tokens, dtype=torch.long), q, tuple(confidences))


@define
class SelfExitDrafter(Drafter):
    """Draft with the target's first `layer` layers and its final norm + LM head."""

    layer: int = field(default=4, validator=[v.instance_of(int), v.ge(1)])
    split: object = field(default=None, init=False, repr=False)  # the target's SplitView

    def before_prefill(self, target, prompt_ids) -> None:
        self.split = target.enable_split(self.layer)

    def begin(self, target, prompt_ids, sampler) -> None:
        self.split = target.enable_split(self.layer)  # idempotent; a wrapper may not have called it

    @torch.inference_mode()
    def _step(self, token: int) -> torch.Tensor:
        hidden = self.split.lower(torch.tensor([token]))  # (1, C)
        return self.split.logits(hidden)[0].float()

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        return draft_with(self._step, context[-1], max_tokens, controller, sampler)
