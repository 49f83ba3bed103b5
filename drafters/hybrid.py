"""Hybrid drafting: an n-gram match from the context when there is one, a model drafter otherwise.

Copying from the context is almost free and, when it matches, often long and right
(summaries, code edits, RAG); the model drafter covers the rest.
"""

from __future__ import annotations

from attrs import define, field

from specframe.interfaces import Drafter
from specframe.plugins import coerce_options, get_registry, parse_part
from specframe.types import Draft

from .ngram import NgramDrafter


@define
class HybridDrafter(Drafter):
    """`ngram` first; when it finds no match, the drafter `fallback` names, written like a part
    anywhere else: NAME[:key=value,...], for example `self_exit:layer=6` (default early_exit)."""

    fallback: str = "early_exit"
    max_ngram: int = 3
    min_ngram: int = 2  # a single-token match is too weak a signal to skip the model drafter
    lookup: NgramDrafter = field(init=False, default=None, repr=False)
    model_drafter: Drafter = field(init=False, default=None, repr=False)
    registry: object = field(init=False, default=None, repr=False)  # the registry that built this drafter

    def use_registry(self, registry) -> None:
        """Find the fallback in `registry` (the decoder's), and check its name and options now."""
        self.registry = registry
        name, options = parse_part(self.fallback, "drafter")
        coerce_options(registry.get("drafter", name), options)

    def _fallback_drafter(self) -> Drafter:
        name, options = parse_part(self.fallback, "drafter")
        return (self.registry or get_registry()).create("drafter", name, options)

    def before_prefill(self, target, prompt_ids) -> None:
        if self.model_drafter is None:
            self.model_drafter = self._fallback_drafter()
        hook = getattr(self.model_drafter, "before_prefill", None)
        if hook is not None:
            hook(target, prompt_ids)

    def begin(self, target, prompt_ids, sampler) -> None:
        self.lookup = NgramDrafter(max_ngram=self.max_ngram, min_ngram=self.min_ngram)
        if self.model_drafter is None:
            self.model_drafter = self._fallback_drafter()
        self.model_drafter.begin(target, prompt_ids, sampler)

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        draft = self.lookup.propose(context, max_tokens, controller, sampler)
        if len(draft):
            return draft
        return self.model_drafter.propose(context, max_tokens, controller, sampler)

    def rollback(self, valid_length: int) -> None:
        self.model_drafter.rollback(valid_length)
