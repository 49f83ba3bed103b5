"""Held-out evaluation of a head: teacher-forced top-1 agreement with the target.

One loop, `agreement`, walks the held-out sequences in padded batches and counts, for each named
figure, how often the head's choice equals the target's argmax; a scorer says, for one batch,
what the head chooses and at which positions each figure counts:
- `early_exit_scorer`: answer and prompt positions, and on answers the choice without context
  tokens (`answer_fixed_vocab`; the same unless `context_vocab`);
- `eagle.eagle_scorer`: the first draft of a round (true last-layer features) on answers and
  prompts, and the second draft on answers (the head's own predicted feature).
With greedy decoding, agreement on answer positions is exactly the per-token acceptance rate: a
drafted token that was accepted equals the target's own, so the head sees the same inputs as in
teacher forcing.

Shapes: B sequences, T positions, C hidden size, R reduced vocabulary.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

import torch
from attrs import field, frozen

from .dataset import DistillSet

_tensor = dict(eq=False, repr=False)


@frozen
class EvalBatch:
    """One padded batch of held-out sequences, as a scorer sees it."""

    indices: list[int]  # the sequences of `DistillSet`
    hidden: torch.Tensor = field(**_tensor)  # (B, T, C) layer-N states in the head's dtype
    valid: torch.Tensor = field(**_tensor)  # (B, T) bool: a real position, not padding
    answer: torch.Tensor = field(**_tensor)  # (B, T) bool: an answer position

    @property
    def prompt(self) -> torch.Tensor:
        return self.valid & ~self.answer


# a scorer: batch -> (figure name, (B, T) chosen target ids, (B, T) bool positions it counts at)
Scorer = Callable[[EvalBatch], Iterable[tuple[str, torch.Tensor, torch.Tensor]]]


def agreement(head, data: DistillSet, device, scorer: Scorer, tokens_per_batch: int = 4096) -> dict:
    """{"NAME_acceptance": agreement, ..., "answer_positions", "prompt_positions"} for each figure
    the scorer names; the head runs in eval mode without gradients and keeps its mode."""
    hits, counts = Counter(), Counter()
    dtype, was_training = head.norm.weight.dtype, head.training
    head.eval()
    try:
        with torch.no_grad():
            for indices in data.batches(tokens_per_batch):
                hidden, ids, _, valid, answer, _ = data.collate(indices, device)
                batch = EvalBatch(indices, hidden.to(dtype), valid, answer)
                for name, choice, mask in scorer(batch):
                    hits[name] += int(((choice == ids[..., 0]) & mask).sum())
                    counts[name] += int(mask.sum())
    finally:
        head.train(was_training)
    return {f"{name}_acceptance": round(hits[name] / max(1, counts[name]), 4) for name in counts} | {
        "answer_positions": counts["answer"], "prompt_positions": counts["prompt"]}


def evaluate(head, data: DistillSet, vocab_map, device, tokens_per_batch: int = 4096, context_vocab: bool = False) -> dict:
    """Top-1 agreement of head and target on held-out answer and prompt positions (teacher-forced).

    An eagle head reports its first and second draft (`eagle.eagle_scorer`). With a reduced
    vocabulary and `context_vocab`, an early-exit head may also pick any token seen earlier in
    the sequence, as the early_exit drafter does with `context_vocab=true`.
    """
    from ..eagle_head import EagleHead

    if isinstance(head, EagleHead):
        from .eagle import eagle_scorer

        scorer = eagle_scorer(head, data)
    else:
        scorer = early_exit_scorer(head, data, vocab_map, context_vocab)
    return agreement(head, data, device, scorer, tokens_per_batch)


def target_ids(head, columns: torch.Tensor) -> torch.Tensor:
    """Columns of the head's vocabulary -> the target's token ids."""
    return columns if head.vocab_ids is None else head.vocab_ids.to(columns.device)[columns]


def early_exit_scorer(head, data: DistillSet, vocab_map, context_vocab: bool = False) -> Scorer:
    def score(batch: EvalBatch):
        features = head.norm(head.body(batch.hidden))  # (B, T, C)
        best, columns = torch.nn.functional.linear(features, head.lm_weight()).max(-1)  # (B, T)
        fixed = chosen = target_ids(head, columns)
        if vocab_map is not None and context_vocab:
            chosen = _with_context_tokens(head, data, batch.indices, features, best, chosen, vocab_map)
        return (("answer", chosen, batch.answer), ("prompt", chosen, batch.prompt),
                ("answer_fixed_vocab", fixed, batch.answer))

    return score


def _with_context_tokens(head, data, indices, features, best, predicted, vocab_map):
    """Where a token seen earlier in the sequence (outside the reduced vocabulary) scores higher, pick it."""
    weight = head.frozen_lm_weight()
    predicted = predicted.clone()
    for row, index in enumerate(indices):
        tokens = data.sequence_tokens(index).to(features.device)  # (n + 1,)
        rows = tokens.numel() - 1
        outside = vocab_map[tokens[:rows]] < 0
        if not outside.any():
            continue
        extra, first = [], []
        for position in torch.nonzero(outside).flatten().tolist():
            token = int(tokens[position])
            if token not in extra:
                extra.append(token)
                first.append(position)
        logits = features[row, :rows] @ weight[torch.tensor(extra, device=weight.device)].T  # (rows, E)
        seen = torch.arange(rows, device=logits.device)[:, None] >= torch.tensor(first, device=logits.device)[None]
        value, choice = logits.masked_fill(~seen, float("-inf")).max(-1)
        better = value > best[row, :rows]
        predicted[row, :rows] = torch.where(better, torch.tensor(extra, device=logits.device)[choice], predicted[row, :rows])
    return predicted
