"""Training and evaluating an early-exit head on a `DistillSet`.

The head (decoder layer(s) + norm + the frozen LM head, optionally over a reduced vocabulary)
reads the layer-N states of whole sequences, teacher-forced, and learns the target's next-token
distribution: `kl` (KL to the target's top-K distribution), `ce` (cross-entropy to the target's
argmax) or `kl+ce`. Its trainable weights, the optimizer and the loss are fp32 whatever the
target's dtype; its matmuls run in `train_dtype` (`precision`: bf16 autocast where the device has
bf16 units); the frozen LM head is cast once (see `options` for the whole dtype policy).
`evaluation` scores held-out data; `checkpoint` lets an interrupted run resume.

Shapes: B sequences, T positions, C hidden size, V vocabulary, R reduced vocabulary, K teacher top-K.
"""

from __future__ import annotations

import json
import math
import time

import attrs
import torch
from attrs import field, frozen
from attrs.validators import ge, in_

from .checkpoint import Checkpoints, TrainingProgress, run_identity
from .dataset import DistillSet
from .evaluation import evaluate
from .losses import distill_loss
from .options import HEAD_KINDS, LOSSES
from .precision import TRAIN_DTYPES, matmul_precision, resolve_train_dtype


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
    train_dtype: str = field(default="auto", validator=in_(TRAIN_DTYPES))  # the head's matmuls (`precision`)


def reduced_vocabulary(sets: list[DistillSet], size: int, always: list[int], vocab_size: int):
    """The `size` most frequent target argmax tokens (plus `always`), sorted; None for the full vocabulary."""
    if not size or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for data in sets:
        counts += torch.bincount(data.top_ids[:, 0].long(), minlength=vocab_size)
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


def train_head(model, train: DistillSet, heldout: DistillSet | None, config: HeadTraining, vocab_ids,
               log=lambda message: None, checkpoints: Checkpoints | None = None) -> tuple:
    """Train a head of `config.head_kind` on `train`; returns (head, curve of held-out evaluations, vocab map).

    With `checkpoints`, a run interrupted after a checkpoint resumes from it (`checkpoint`).
    """
    from tqdm import tqdm

    from ..heads import head_class

    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    head = head_class(config.head_kind, "(training)")(model, config.layer, config.head_layers, vocab_ids)
    head = head.to(device).float().train()
    vocab_map = head_vocab_map(head, device)
    generator = torch.Generator().manual_seed(config.seed)
    plan = [b for _ in range(config.epochs) for b in train.batches(config.tokens_per_batch, generator)]
    total = max(1, len(plan))
    parameters, optimizer, schedule = _optimisation(head, config, total)
    identity = run_identity(config, train, vocab_ids)
    progress = (checkpoints and checkpoints.resume(identity, head, optimizer, schedule, generator)) or TrainingProgress()
    if progress.step:
        log(f"resumed from {checkpoints.path} at step {progress.step} of {total}")
    precision = resolve_train_dtype(config.train_dtype, device)
    eval_points = {int(total * f) for f in _eval_fractions(config.eval_points)}
    started, seen_before = time.perf_counter(), progress.seen
    bar = tqdm(total=total, initial=progress.step, desc=f"train {config.head_kind} N={config.layer} {config.loss} "
               f"{precision}", unit="step", dynamic_ncols=True)
    try:
        for indices in plan[progress.step:]:
            loss, positions = batch_loss(head, train, indices, config, vocab_map, generator, precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            progress.advance(loss.item(), positions)
            rate = (progress.seen - seen_before) / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{progress.smoothed:.3f}", tok_per_s=f"{rate:.0f}")
            bar.update(1)
            evaluated = heldout is not None and progress.step in eval_points
            if evaluated:
                progress.curve.append(_evaluation_point(head, heldout, vocab_map, progress, started))
                log(f"eval {json.dumps(progress.curve[-1])}")
            if checkpoints and progress.step < total and (evaluated or checkpoints.due()):
                _save(checkpoints, identity, progress, started, head, optimizer, schedule, generator)
    except KeyboardInterrupt:
        if checkpoints and progress.step:
            _save(checkpoints, identity, progress, started, head, optimizer, schedule, generator)
            log(f"interrupted: saved a checkpoint at step {progress.step} of {total} in {checkpoints.path}; "
                "the same command resumes from it")
        raise
    bar.close()
    return head.eval(), progress.curve, vocab_map


def _optimisation(head, config: HeadTraining, total: int) -> tuple:
    """(trainable parameters, AdamW, its schedule: linear warm-up, then cosine decay over `total` steps)."""
    parameters = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = min(100, total // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    return parameters, optimizer, schedule


def _evaluation_point(head, heldout: DistillSet, vocab_map, progress: TrainingProgress, started: float) -> dict:
    minutes = progress.minutes + (time.perf_counter() - started) / 60
    return {"step": progress.step, "tokens_seen": progress.seen, "minutes": round(minutes, 2),
            "loss": round(progress.smoothed, 4), **evaluate(head, heldout, vocab_map, head.norm.weight.device)}


def batch_loss(head, data: DistillSet, indices: list[int], config: HeadTraining, vocab_map, generator,
               precision: str) -> tuple[torch.Tensor, int]:
    """(the loss of one batch of sequences, its number of positions); the head's matmuls in `precision`."""
    device = head.norm.weight.device
    hidden, ids, logprobs, valid, answer, weights = data.collate(indices, device)
    ids, logprobs = head_targets(ids, logprobs, vocab_map)
    weights = weights * torch.where(answer, 1.0, config.prompt_weight)
    with matmul_precision(precision, device):
        if config.head_kind == "eagle":
            from .eagle import eagle_loss

            previous, own = data.collate_features(indices, device)
            loss = eagle_loss(head, hidden, previous, own, ids, logprobs, weights, config, generator)
        else:
            loss = distill_loss(head(hidden), ids, logprobs, weights, config.loss)
    return loss, int(valid.sum())


def _save(checkpoints, identity, progress, started, head, optimizer, schedule, generator) -> None:
    """A checkpoint whose progress counts this process's training minutes too."""
    minutes = progress.minutes + (time.perf_counter() - started) / 60
    checkpoints.save(identity, attrs.evolve(progress, minutes=minutes), head, optimizer, schedule, generator)


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
