"""Prompt-lookup drafting (Saxena 2023; transformers' `prompt_lookup_num_tokens`)."""

from __future__ import annotations

import torch
from attrs import define, field, validators as v

from specframe.interfaces import Drafter
from specframe.types import Draft


def find_continuation(context: list[int], max_ngram: int, min_ngram: int, max_tokens: int) -> list[int]:
    """Match the last n tokens (longest n first) earlier in the context; return what followed.

    The most recent earlier match wins.
    """
    T = len(context)
    for n in range(min(max_ngram, T - 1), min_ngram - 1, -1):
        suffix = context[T - n :]
        for start in range(T - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + max_tokens]
    return []


@define
class NgramDrafter(Drafter):
    """Deterministic: proposes the tokens that followed the latest earlier match of the context's
    last n tokens (n from max_ngram down to min_ngram). q is one-hot (returned as None)."""

    max_ngram: int = field(default=3, validator=[v.instance_of(int), v.ge(1)])
    min_ngram: int = field(default=1, validator=[v.instance_of(int), v.ge(1)])

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        proposal = find_continuation(context, self.max_ngram, self.min_ngram, max_tokens)
        tokens: list[int] = []
        for token in proposal:
            tokens.append(token)
            if not controller.keep_drafting(len(tokens), 1.0):
                break
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long), confidences=(1.0,) * len(tokens))
