"""Training and evaluating an eagle head (`specframe.eagle_head`) on a `DistillSet` with features.

Loss per batch, after EAGLE (Li et al. 2024) and EAGLE-3's training-time test:
1. the head reads the true last-layer features of the previous positions, with uniform noise
   U(-a, a) added (`feature_noise`): smooth L1 between its predicted features f^ and the
   target's, plus `ce_weight` x the token loss of `--loss` (as for an `EarlyExitHead`);
2. training-time test: the head reads its own predicted features of step 1 (detached), as the
   second draft of a round does, with the same two losses.
The batch loss is the mean of the two steps.

Evaluation (`eagle_scorer`, for `evaluation.agreement`) is teacher-forced top-1 agreement on
held-out answer positions for the first draft of a round (true features: the same figure as an
`EarlyExitHead`'s acceptance) and the second (features predicted by the head, given a correct
first draft).

Shapes: B sequences, T positions, C hidden size, R reduced vocabulary, K teacher top-K.
"""

from __future__ import annotations

import torch

from .dataset import DistillSet, previous_positions


def feature_regression(predicted, target, weights):
    """Smooth L1 per position (mean over C), weighted by (B, T) `weights`."""
    per_row = torch.nn.functional.smooth_l1_loss(predicted.float(), target, reduction="none").mean(-1)  # (B, T)
    return (per_row * weights).sum() / weights.sum().clamp(min=1)


def eagle_loss(head, hidden, previous, own, ids, logprobs, weights, config, generator=None):
    """The batch loss above. hidden/previous/own (B, T, C); ids/logprobs (B, T, K) in head space."""
    from .head import distill_loss

    noise = (torch.rand(previous.shape, generator=generator) * 2 - 1).to(previous.device) * config.feature_noise
    total = hidden.new_zeros(())
    inputs = previous + noise
    for _ in range(2):  # step 1: true (noisy) features; step 2: the head's own, as a later draft
        logits, predicted = head(hidden, inputs)
        total = total + feature_regression(predicted, own, weights) + config.ce_weight * distill_loss(
            logits, ids, logprobs, weights, config.loss)
        inputs = previous_positions(predicted.detach())
    return total / 2


def eagle_scorer(head, data: DistillSet):
    """`evaluation.agreement`'s scorer for an eagle head: the first draft of a round (true
    features of the previous positions) on answers and prompts, and the second (the head's own
    predicted features, given a correct first draft) on answers."""
    from .evaluation import target_ids

    def score(batch):
        previous, _ = data.collate_features(batch.indices, batch.hidden.device)
        first, predicted = head(batch.hidden, previous.to(batch.hidden.dtype))
        second, _ = head(batch.hidden, previous_positions(predicted))
        first, second = target_ids(head, first.argmax(-1)), target_ids(head, second.argmax(-1))
        return (("answer", first, batch.answer), ("prompt", first, batch.prompt),
                ("second_draft", second, batch.answer))

    return score
