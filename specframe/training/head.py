"""Training and evaluating an early-exit head on a `DistillSet`.

The head (decoder layer(s) + norm + the frozen LM head, optionally over a reduced vocabulary)
reads the layer-N states of whole sequences, teacher-forced, and learns the target's next-token
distribution: `kl` (KL to the target's top-K distribution), `ce` (cross-entropy to the target's
argmax) or `kl+ce`. Its trainable weights, the optimizer and the loss are fp32 whatever the
target's dtype; the frozen LM head is cast once (see `options` for the whole dtype policy).

Shapes: B sequences, T positions, C hidden size, V vocabulary, R reduced vocabulary, K teacher top-K.
"""

from __future__ import annotations

import json
import math
import time

import torch
from attrs import field, frozen
from attrs.validators import ge, in_

from .dataset import DistillSet
from .options import HEAD_KINDS, LOSSES


@frozen(kw_only=True)
class HeadTraining:
    """How to train a head: its shape, the loss and the optimisation schedule."""

    layer: int = field(validator=ge(1))  # exit layer N: the head reads the state after N layers
    head_layers: int = field(default=1, validator=ge(1))  # decoder layers in the head
    loss: str = field(default="kl", validator=in_(LOSSES))
    epochs: int = field(default=2, validator=ge(0))  # passes over the training data
    lr: float = 3e-3  # peak AdamW learning rate (warm-up, cosine decay)
    tokens_per_batch: int = field(default=1024, validator=ge(1))  # padded positions per step
    prompt_weight: float = 1.0  # loss weight of prompt positions (answers: 1)
    seed: int = 0
    eval_points: int = field(default=4, validator=ge(0))  # held-out evaluations during training
    head_kind: str = field(default="early_exit", validator=in_(HEAD_KINDS))
    ce_weight: float = 1.0  # eagle: loss = feature regression + ce_weight x the token loss
    feature_noise: float = 0.1  # eagle: uniform noise U(-a, a) on the input features


def reduced_vocabulary(sets: list[DistillSet], size: int, always: list[int], vocab_size: int):
    """The `size` most frequent target argmax tokens (plus `always`), sorted; None for the full vocabulary."""
    if not size or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for data in sets:
        counts += torch.bincount(data.top_ids[:, 0], minlength=vocab_size)
    counts[torch.tensor(always, dtype=torch.long)] = counts.max() + 1
    return torch.sort(torch.topk(counts, size).indices).values


def head_vocab_map(head, device):
    """(V,) target id -> column of the head's reduced vocabulary, -1 outside it; None for a full vocabulary."""
    if head.vocab_ids is None:
        return None
    vocab_map = torch.full((head.full_vocab_size,), -1, dtype=torch.long, device=device)
    vocab_map[head.vocab_ids.to(device)] = torch.arange(len(head.vocab_ids), device=device)
    return vocab_map


def head_targets(ids, logprobs, vocab_map):
    """Map teacher ids to the head's vocabulary: (ids in head space, log-probs with -inf where absent)."""
    if vocab_map is None:
        return ids, logprobs
    mapped = vocab_map[ids]  # -1 where the token is outside the reduced vocabulary
    return mapped.clamp(min=0), torch.where(mapped >= 0, logprobs, torch.full_like(logprobs, float("-inf")))


def distill_loss(logits, ids, logprobs, weights, loss: str):
    """Per-batch loss. logits (B, T, R); ids/logprobs (B, T, K) in head space; weights (B, T).

    kl: cross-entropy of q against the target's top-K distribution renormalised over what the head
    can express (= KL up to a constant); ce: cross-entropy to the target's argmax (rows whose
    argmax the head cannot express are skipped).
    """
    log_q = torch.log_softmax(logits.float(), -1)  # (B, T, R)
    picked = log_q.gather(-1, ids)  # (B, T, K)
    total = logits.new_zeros(())
    if "kl" in loss:
        p = torch.softmax(logprobs, -1).nan_to_num(0.0)  # renormalised top-K, rows of -inf -> 0
        per_row = -(p * picked).sum(-1)
        has_mass = torch.isfinite(logprobs).any(-1)
        w = weights * has_mass
        total = total + (per_row * w).sum() / w.sum().clamp(min=1)
    if "ce" in loss:
        expressible = torch.isfinite(logprobs[..., 0])
        w = weights * expressible
        total = total + (-(picked[..., 0]) * w).sum() / w.sum().clamp(min=1)
    return total


def evaluate(head, data: DistillSet, vocab_map, device, tokens_per_batch: int = 4096, context_vocab: bool = False) -> dict:
    """Top-1 agreement of head and target on answer and prompt positions (teacher-forced).

    With a reduced vocabulary and `context_vocab`, the head may also pick any token seen earlier
    in the sequence, as the early_exit drafter does with `context_vocab=true`. An eagle head is
    evaluated by `eagle.evaluate_eagle` (first and second draft of a round).
    """
    from ..eagle_head import EagleHead

    if isinstance(head, EagleHead):
        from .eagle import evaluate_eagle

        return evaluate_eagle(head, data, vocab_map, device, tokens_per_batch)
    names = ("answer", "prompt", "answer_fixed_vocab")
    hits, counts = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    dtype = head.norm.weight.dtype
    head.eval()
    with torch.no_grad():
        for indices in data.batches(tokens_per_batch):
            hidden, ids, _, valid, answer, _ = data.collate(indices, device)
            features = head.norm(head.body(hidden.to(dtype)))  # (B, T, C)
            best, predicted = torch.nn.functional.linear(features, head.lm_weight()).max(-1)  # (B, T)
            fixed = predicted = predicted if vocab_map is None else head.vocab_ids.to(device)[predicted]
            if vocab_map is not None and context_vocab:
                predicted = _with_context_tokens(head, data, indices, features, best, predicted, vocab_map)
            for name, choice, mask in (("answer", predicted, answer), ("prompt", predicted, valid & ~answer),
                                       ("answer_fixed_vocab", fixed, answer)):
                hits[name] += int(((choice == ids[..., 0]) & mask).sum())
                counts[name] += int(mask.sum())
    head.train()
    return {f"{name}_acceptance": round(hits[name] / max(1, counts[name]), 4) for name in names} | {
        "answer_positions": counts["answer"], "prompt_positions": counts["prompt"]}


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


def train_head(model, train: DistillSet, heldout: DistillSet | None, config: HeadTraining, vocab_ids,
               log=lambda message: None) -> tuple:
    """Train an EarlyExitHead on `train`; returns (head, curve of held-out evaluations, vocab map)."""
    from tqdm import tqdm

    from ..heads import head_class

    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    kind = head_class(config.head_kind, "(training)")
    head = kind(model, config.layer, config.head_layers, vocab_ids).to(device).float().train()
    vocab_map = head_vocab_map(head, device)
    parameters = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(config.seed)
    plan = [b for _ in range(config.epochs) for b in train.batches(config.tokens_per_batch, generator)]
    total = max(1, len(plan))
    warmup = min(100, total // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    curve, started, seen, smoothed = [], time.perf_counter(), 0, None
    eval_points = {int(total * f) for f in _eval_fractions(config.eval_points)}
    bar = tqdm(plan, desc=f"train {config.head_kind} N={config.layer} {config.loss}", unit="step", dynamic_ncols=True)
    for step, indices in enumerate(bar, 1):
        hidden, ids, logprobs, valid, answer, weights = train.collate(indices, device)
        ids, logprobs = head_targets(ids, logprobs, vocab_map)
        weights = weights * torch.where(answer, 1.0, config.prompt_weight)
        if config.head_kind == "eagle":
            from .eagle import eagle_loss

            previous, own = train.collate_features(indices, device)
            loss = eagle_loss(head, hidden, previous, own, ids, logprobs, weights, config, generator)
        else:
            loss = distill_loss(head(hidden), ids, logprobs, weights, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        seen += int(valid.sum())
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        bar.set_postfix(loss=f"{smoothed:.3f}", tok_per_s=f"{seen / (time.perf_counter() - started):.0f}")
        if heldout is not None and step in eval_points:
            point = {"step": step, "tokens_seen": seen, "minutes": round((time.perf_counter() - started) / 60, 2),
                     "loss": round(smoothed, 4), **evaluate(head, heldout, vocab_map, device)}
            curve.append(point)
            log(f"eval {json.dumps(point)}")
    bar.close()
    return head.eval(), curve, vocab_map


def _eval_fractions(points: int) -> list[float]:
    return [i / points for i in range(1, points + 1)] if points > 0 else [1.0]


def measure_draft_cost(model, head, context_tokens: int = 300, repeats: int = 30) -> dict:
    """Median time of one draft step (layers [0, N) + head + its LM head) and of a one-token full
    forward, interleaved, at a context of `context_tokens` tokens, through specframe's own paths.
    `head` must be in the target's dtype, as when drafting."""
    from ..timing import early_exit_drafter, measure

    result = measure(model, [1], context_tokens, repeats, early_exit_drafter(head))
    return {"full_forward_ms": result["forward_ms"]["1"], "draft_step_ms": result["draft_step_ms"],
            "draft_step_over_forward": result["draft_step_over_forward"], "context_tokens": context_tokens,
            "torch_threads": torch.get_num_threads()}
