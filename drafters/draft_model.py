"""Drafting with a separate, smaller Hugging Face causal LM that shares the target's tokenizer."""

from __future__ import annotations

import torch
from attrs import define, field

from specframe.errors import ConfigError, ModelMismatchError
from specframe.interfaces import Drafter
from specframe.target import TargetModel
from specframe.types import Draft

from .self_exit import draft_with


@define
class DraftModelDrafter(Drafter):
    """Its own KV cache, rolled back with the target's. `model` is a local model directory or an
    already loaded `PreTrainedModel` (from Python)."""

    model: object = field(default=None)
    drafter_model: TargetModel | None = field(default=None, init=False, repr=False)

    def begin(self, target, prompt_ids, sampler) -> None:
        if self.drafter_model is None:
            self.drafter_model = TargetModel(_load(self.model, target))
        self.drafter_model.reset()
        draft_vocab = self.drafter_model.vocab_size
        if draft_vocab != target.vocab_size:
            raise ModelMismatchError(
                f"draft model vocabulary has {draft_vocab} tokens but the target's has "
                f"{target.vocab_size}; use a draft model with the same tokenizer"
            )

    @torch.inference_mode()
    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Feed the tokens the draft model has not seen; return its (V,) logits for the next one."""
        unseen = torch.tensor(context[self.drafter_model.length :], dtype=torch.long)
        return self.drafter_model.forward(unseen, logits_to_keep=1)[-1].float()

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        first = [True]

        def step(token: int) -> torch.Tensor:
            if first[0]:
                first[0] = False
                return self._catch_up(context)
            return self.drafter_model.forward(torch.tensor([token]))[-1].float()

        return draft_with(step, context[-1], max_tokens, controller, sampler)

    def rollback(self, valid_length: int) -> None:
        if self.drafter_model is not None and self.drafter_model.length > valid_length:
            self.drafter_model.rollback(valid_length)


def _load(model, target):
    if model is None:
        raise ConfigError("draft_model needs a model: --drafter-opt model=PATH (a local HF model directory)")
    if isinstance(model, str):
        from specframe.models import load_model

        loaded, _ = load_model(model, device=target.device, dtype=target.dtype)
        return loaded
    return model
