"""EESD's drafter: the target's own first N layers, then a trained early-exit head.

Liu et al., "Speculative Decoding via Early-exiting for Faster LLM Inference with Thompson
Sampling Control Mechanism", Findings of ACL 2024 (arXiv 2406.03853).

`before_prefill` splits the target at layer N (`TargetModel.enable_split`), so the prefill keeps
the prompt's states there. Each draft token runs layers [0, N) once (`SplitView.lower`); verification then
reuses their KV cache and activations and runs only layers N..L-1 for it. The head (one decoder
layer + norm + the frozen tied LM head, see `specframe.heads`) keeps its own KV cache: filled
for the prompt from the split-layer states, extended with every drafted token, rolled back with
the target's, and caught up from the target's stored split-layer states for tokens that
verification lowered itself (the bonus or correction token).

An eagle head (`specframe.eagle_head`, chosen by the head file) also reads the target's
last-layer feature of the previous position: the split then keeps those of verified tokens
(`SplitView.final_hidden`); the first draft of a round reads the true one, later drafts the
head's own prediction, and positions drafted from a prediction are recomputed once verified.
In a tree each node reads its parent's predicted feature (the root's: the true one); a tree pass
keeps the features of the accepted path (`TargetModel.keep_path`).
"""

from __future__ import annotations

import torch
from attrs import define, field, validators as v

from specframe.errors import SpecframeError
from specframe.eagle_head import EagleHead
from specframe.heads import EarlyExitHead
from specframe.interfaces import Drafter
from specframe.types import Draft

from .self_exit import draft_with
from .dynamic_tree import draft_dynamic_tree, head_tree_logits
from .tree_drafting import draft_tree_with, planned_width

MAX_WIDTH = 8  # candidates per depth
TREE_SHAPES = ("fixed", "dynamic")  # drafters/tree_drafting.py, drafters/dynamic_tree.py


def _agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


@define
class EarlyExitDrafter(Drafter):
    """Draft with the target's first N layers and a trained head (N is stored in the head)."""

    # a head file's path, or an EarlyExitHead already loaded (from Python); None = the shipped head
    head: object = field(default=None, validator=v.optional(v.instance_of((str, EarlyExitHead))))
    # also draft tokens of the context outside a reduced vocabulary (measured: no gain, see docs/eesd.md)
    context_vocab: bool = field(default=False, validator=v.instance_of(bool))
    # candidates per depth: 1 drafts a chain; w > 1 a tree with w - 1 alternatives beside each
    # chain token (drafters/tree_drafting.py), verified in the same pass
    width: int = field(default=1, validator=[v.instance_of(int), v.ge(1), v.le(MAX_WIDTH)])
    # with width > 1: "fixed" (the chain and leaves beside it) or "dynamic" (expand the nodes of
    # highest cumulative probability, EAGLE-2; drafters/dynamic_tree.py)
    tree: str = field(default="fixed", validator=v.in_(TREE_SHAPES))
    split: object = field(default=None, init=False, repr=False)  # the target's SplitView
    model: object = field(default=None, init=False, repr=False)  # the head (an EarlyExitHead)
    _loaded_for: int | None = field(default=None, init=False, repr=False)
    _vocab_seen: int = field(default=0, init=False, repr=False)  # context tokens already in the head's vocab
    _feature: object = field(default=None, init=False, repr=False)  # eagle: (1, C) feature for the next draft
    _feature_is_true: bool = field(default=False, init=False, repr=False)  # the target's own, not predicted
    _head_ids: list = field(factory=list, init=False, repr=False)  # the tokens in the head's cache
    _drafted_tree: bool = field(default=False, init=False, repr=False)  # the last round drafted a tree

    def before_prefill(self, target, prompt_ids) -> None:
        """Split the target at the head's layer, so the prefill keeps the prompt's states there."""
        if not target.layered:
            raise SpecframeError(f"{type(target.model).__name__} is not a Llama-style decoder, so the early_exit "
                                 "drafter cannot split it; use a drafter such as 'ngram' or 'draft_model'")
        self._load(target)
        self.split = target.enable_split(self.model.exit_layer, final=self.reads_final)

    @property
    def reads_final(self) -> bool:
        """Whether the head also reads the target's last-layer features (an eagle head)."""
        return isinstance(self.model, EagleHead)

    def begin(self, target, prompt_ids, sampler) -> None:
        self.before_prefill(target, prompt_ids)  # idempotent; a wrapper may not have called it
        self.model.reset_cache()
        self.model.reset_context_vocab()
        self._vocab_seen = 0
        self._head_ids = list(prompt_ids)
        self._drafted_tree = False
        if prompt_ids:
            self._catch_up(len(prompt_ids))

    def _catch_up(self, committed: int) -> None:
        """Run the head over verified positions it has not seen (or saw only with predicted features)."""
        start = self.model.length
        if self.reads_final:
            self.model.rollback(self.model.exact_length)
            start = self.model.length
            if start < committed:
                self.model.extend_with(self.split.hidden(start, committed), self._previous(start, committed), exact=True)
            self._feature, self._feature_is_true = self._previous(committed, committed + 1), True
        elif start < committed:
            self.model.extend(self.split.hidden(start, committed), logits=False)

    def _previous(self, start: int, end: int) -> torch.Tensor:
        """(end - start, C) the target's last-layer features of positions [start - 1, end - 1); zeros before 0."""
        features = self.split.final_hidden(max(0, start - 1), end - 1)
        if start == 0:
            features = torch.cat([features.new_zeros(1, features.shape[1]), features])
        return features

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        committed = len(context) - 1  # context[-1] is pending: not yet run through the model
        if self.context_vocab and self._vocab_seen < len(context):
            self.model.add_context_vocab(context[self._vocab_seen :])
            self._vocab_seen = len(context)
        if self._drafted_tree:  # a tree's accepted path may leave the chain the head cached
            self.rollback(_agreement(self._head_ids, context[:committed]))
        self._catch_up(committed)  # tokens that verification lowered (bonus/correction)
        self._head_ids = list(context[:committed])
        # the controller may plan the width (thompson_cost with max_width > 1)
        width = planned_width(controller, self.width, MAX_WIDTH)
        self._drafted_tree = width > 1
        if width > 1 and self.tree == "dynamic":
            return self._draft_dynamic(context, max_tokens, width, controller, sampler)
        if width > 1:
            return draft_tree_with(self._step, context[-1], max_tokens, width, controller, sampler)
        return draft_with(self._step, context[-1], max_tokens, controller, sampler)

    def _draft_dynamic(self, context, max_tokens, width, controller, sampler) -> Draft:
        """A dynamic tree; the head's cache then keeps only the root (the accepted path is caught up
        from the target's split states after verification)."""
        committed, parents, features = len(context) - 1, [], []  # features: eagle's f^ of each node

        @torch.inference_mode()
        def expand(tokens: torch.Tensor, new_parents: tuple[int, ...]) -> torch.Tensor:
            parents.extend(new_parents)
            hidden = self.split.lower_tree(tokens, new_parents)  # (T, C)
            previous = None
            if self.reads_final:  # each node reads its parent's predicted feature (the root's: _step's)
                previous = torch.cat([self._feature if p < 0 else features[p] for p in new_parents])  # (T, C)
            logits, new_features = head_tree_logits(self.model, hidden, tuple(parents), committed, previous)
            features.extend(new_features.split(1))
            return logits  # (T, V)

        draft = draft_dynamic_tree(self._step, expand, context[-1], max_tokens, width, controller, sampler)
        self.rollback(committed + 1)
        return draft

    @torch.inference_mode()
    def _step(self, token: int) -> torch.Tensor:
        hidden = self.split.lower(torch.tensor([token]))  # (1, C) after layer N
        self._head_ids.append(token)
        if self.reads_final:  # the first draft reads the true feature, later ones the predicted one
            exact = self._feature_is_true
            logits, self._feature = self.model.extend_with(hidden, self._feature, exact=exact)  # (1, R), (1, C)
            self._feature_is_true = False
        else:
            logits = self.model.extend(hidden)  # (1, R)
        return self.model.to_full_vocab(logits)[0].float()  # (V,), -inf outside a reduced vocabulary

    def rollback(self, valid_length: int) -> None:
        if self.model is not None:
            self.model.rollback(valid_length)
        del self._head_ids[valid_length:]

    def _load(self, target) -> None:
        if self._loaded_for == id(target.model):
            return
        from specframe.heads import shipped_head_path

        if isinstance(self.head, EarlyExitHead):
            self.model, self._loaded_for = self.head, id(target.model)
            return
        path = self.head or shipped_head_path(target.model)
        if path is None:
            raise SpecframeError(
                "no early-exit head ships for this model; train one with `specframe train early-exit --model PATH "
                "--output HEAD.safetensors` and pass `--drafter-opt head=HEAD.safetensors`"
            )
        self.model = EarlyExitHead.from_pretrained(path, target.model)
        self._loaded_for = id(target.model)

