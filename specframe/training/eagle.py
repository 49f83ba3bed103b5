"""Training and evaluating an eagle head (`specframe.eagle_head`) on a `DistillSet` with features.

Loss per batch, after EAGLE (Li et al. 2024) and EAGLE-3's training-time test:
1. the head reads the true last-layer features of the previous positions, with uniform noise
   U(-a, a) added (`feature_noise`): smooth L1 between its predicted features f^ and the
   target's, plus `ce_weight` x the token loss of `--loss` (as for an `EarlyExitHead`);
2. training-time test: the head reads its own predicted features of step 1 (detached), as the
   second draft of a round does, with the same two losses.
The batch loss is the mean of the two steps.

Evaluation is teacher-forced top-1 agreement on held-out answer positions for the first draft of
a round (true features: the same figure as an `EarlyExitHead`'s acceptance) and the second
(features predicted by the head, given a correct first draft).

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


def evaluate_eagle(head, data: DistillSet, vocab_map, device, tokens_per_batch: int = 4096) -> dict:
    """First- and second-draft top-1 agreement on answers, and first-draft agreement on prompts."""
    names = ("answer", "prompt", "second_draft")
    hits, counts = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    dtype = head.norm.weight.dtype
    head.eval()
    with torch.no_grad():
        for indices in data.batches(tokens_per_batch):
            hidden, ids, _, valid, answer, _ = data.collate(indices, device)
            previous, _ = data.collate_features(indices, device)
            first, predicted = head(hidden.to(dtype), previous.to(dtype))
            second, _ = head(hidden.to(dtype), previous_positions(predicted))
            for name, logits, mask in (("answer", first, answer), ("prompt", first, valid & ~answer),
                                       ("second_draft", second, answer)):
                choice = logits.argmax(-1)
                choice = choice if vocab_map is None else head.vocab_ids.to(device)[choice]
                hits[name] += int(((choice == ids[..., 0]) & mask).sum())
                counts[name] += int(mask.sum())
    head.train()
    return {f"{name}_acceptance": round(hits[name] / max(1, counts[name]), 4) for name in names} | {
        "answer_positions": counts["answer"], "prompt_positions": counts["prompt"]}
