"""Hybrid drafting: an n-gram match from the context when there is one, a model drafter otherwise.

Copying from the context is almost free and, when it matches, often long and right
(summaries, code edits, RAG); the model drafter covers the rest.
"""

from __future__ import annotations

from attrs import define, field

from specframe.interfaces import Drafter
from specframe.plugins import get_registry
from specframe.types import Draft

from .ngram import NgramDrafter


@define
class HybridDrafter(Drafter):
    """`ngram` first; when it finds no match, the drafter named by `fallback` (default early_exit)."""

    fallback: str = "early_exit"
    fallback_options: str = ""  # "key=value,key=value" passed to the fallback drafter
    max_ngram: int = 3
    min_ngram: int = 2  # a single-token match is too weak a signal to skip the model drafter
    lookup: NgramDrafter = field(init=False, default=None, repr=False)
    model_drafter: Drafter = field(init=False, default=None, repr=False)

    def begin(self, target, prompt_ids, sampler) -> None:
        self.lookup = NgramDrafter(max_ngram=self.max_ngram, min_ngram=self.min_ngram)
        if self.model_drafter is None:
            options = dict(pair.split("=", 1) for pair in self.fallback_options.split(",") if "=" in pair)
            self.model_drafter = get_registry().create("drafter", self.fallback, options)
        self.model_drafter.begin(target, prompt_ids, sampler)

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        draft = self.lookup.propose(context, max_tokens, controller, sampler)
        if len(draft):
            return draft
        return self.model_drafter.propose(context, max_tokens, controller, sampler)

    def rollback(self, valid_length: int) -> None:
        self.model_drafter.rollback(valid_length)
