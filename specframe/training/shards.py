"""Distillation shards: what the target says at every position of a batch of sequences.

A shard holds, for each sequence of a batch, its tokens and, per position that predicts a next
token, the hidden state after each stored layer and the target's top-K next-token
log-probabilities. Two sources fill it, through one assembly (`assemble_shard`):
- `generate_shard`: the target answers prompts with batched greedy `generate` (left padding);
- `teacher_forced_shard`: one forward pass over given sequences (right padding), for recorded
  answers and for tests.

Shapes: B sequences, T positions, C hidden size, V vocabulary, K teacher top-K.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import attrs
from attrs import frozen

SHARD_FORMAT = 1


@frozen(kw_only=True)
class ShardSettings:
    """What a set of shards depends on besides the model: also their cache key."""

    layers: tuple[int, ...] = attrs.field(converter=tuple)  # layers whose outputs are stored
    max_prompt_tokens: int
    batch_size: int  # sequences per shard
    top_k: int  # teacher log-probs kept per position
    order_seed: int  # seed of the prompt order
    max_new_tokens: int | None = None  # generated answers: tokens the target generates
    max_answer_tokens: int | None = None  # recorded answers (teacher-forced): tokens kept
    dtype: str = "fp32"  # the target's dtype while recording
    store_final: bool = False  # also store the last-layer feature (after the final norm), for eagle heads

    @property
    def teacher_forced(self) -> bool:
        return self.max_answer_tokens is not None

    def cache_key(self) -> dict:
        """The settings as the cache key; fp32 data keep the key they had before the dtype was part of it."""
        key = {"format": SHARD_FORMAT, "layers": sorted(self.layers), "max_prompt_tokens": self.max_prompt_tokens,
               "batch_size": self.batch_size, "top_k": self.top_k, "order_seed": self.order_seed}
        if self.teacher_forced:
            key.update(teacher_forced=True, max_answer_tokens=self.max_answer_tokens)
        else:
            key["max_new_tokens"] = self.max_new_tokens
        if self.dtype != "fp32":
            key["dtype"] = self.dtype
        if self.store_final:
            key["final"] = True
        return key


def data_dir(fingerprint: dict, settings: ShardSettings, split: str) -> Path:
    from ..models import cache_dir

    key = json.dumps({"model": fingerprint["weights_sha256"], **settings.cache_key()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "distill" / f"{split}-{digest}"


# ---- prompts ----------------------------------------------------------------------------------
def encode_prompt(tokenizer, text: str, max_prompt_tokens: int) -> list[int]:
    """Chat-templated ids of a user turn cut to `max_prompt_tokens` tokens, as specframe run encodes."""
    user_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_prompt_tokens]
    messages = [{"role": "user", "content": tokenizer.decode(user_ids)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def encode_exchange(tokenizer, prompt: str, answer: str, max_prompt_tokens: int, max_answer_tokens: int) -> tuple[list[int], int]:
    """Chat-templated ids of a prompt and a recorded (not target-generated) answer, and the prompt length."""
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_tokens)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
    return prompt_ids + answer_ids, len(prompt_ids)


def batches_of_prompts(count: int, length_of, batch_size: int, seed: int, num_batches: int) -> list[list[int]]:
    """The first `num_batches` batches of prompt indices: a seeded order, sorted by length within
    groups of 8 batches (less padding). `length_of(i)` is only asked for prompts in those groups.

    The order does not depend on how many batches are used, so a larger run extends a smaller
    one's cached shards.
    """
    order = list(range(count))
    random.Random(seed).shuffle(order)
    batches = []
    group = 8 * batch_size
    for start in range(0, len(order), group):
        if len(batches) >= num_batches:
            break
        chunk = sorted(order[start : start + group], key=length_of)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return batches[:num_batches]


def eos_ids_of(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and the generation config's."""
    from ..models import eos_token_ids

    return sorted(eos_token_ids(tokenizer, model))


# ---- recording --------------------------------------------------------------------------------
class _Recorder:
    """Forward hooks that keep the outputs of chosen layers (1-based) and of the final norm, per call."""

    def __init__(self, model, layers):
        inner = model.model
        self.calls: dict[str, list] = {f"hidden_{n}": [] for n in layers}
        self.calls["final"] = []
        self.handles = [inner.layers[n - 1].register_forward_hook(self._keep(f"hidden_{n}")) for n in layers]
        self.handles.append(inner.norm.register_forward_hook(self._keep("final")))

    def _keep(self, name):
        def hook(module, inputs, output):
            self.calls[name].append((output[0] if isinstance(output, tuple) else output).detach())
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def _padded(batch: list[list[int]], pad: int, left: bool):
    """(B, T) ids and attention mask of sequences padded on the left or the right."""
    import torch

    B, T = len(batch), max(len(ids) for ids in batch)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for row, ids in enumerate(batch):
        columns = slice(T - len(ids), T) if left else slice(0, len(ids))
        input_ids[row, columns] = torch.tensor(ids)
        attention[row, columns] = 1
    return input_ids, attention


def _top_k(logits, k: int):
    """(..., V) logits -> the top-k (values, indices) of their fp32 log-softmax."""
    import torch

    return torch.log_softmax(logits.float(), -1).topk(k, -1)


def generate_shard(model, tokenizer, batch: list[list[int]], settings: ShardSettings, eos_ids: list[int]) -> dict:
    """Greedy answers to one batch of prompts, with layer states and teacher top-K per position."""
    import torch

    P = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    input_ids, attention = _padded(batch, pad, left=True)
    recorder = _Recorder(model, settings.layers)
    try:
        with torch.inference_mode():
            out = model.generate(input_ids.to(model.device), attention_mask=attention.to(model.device),
                                 max_new_tokens=settings.max_new_tokens, do_sample=False,
                                 eos_token_id=eos_ids, pad_token_id=pad, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        recorder.close()
    steps = len(out.logits)
    # per call: (B, T, C); concatenated along T -> positions 0..P+steps-2 of the padded sequences
    hidden = {name: torch.cat(calls, 1)[:, : P + steps - 1] for name, calls in recorder.calls.items()}
    with torch.inference_mode():
        prompt_top = _top_k(model.lm_head(_final(hidden, settings)[:, : P - 1]), settings.top_k)  # (B, P-1, K)
        step_top = _top_k(torch.stack(out.logits, 1), settings.top_k)  # (B, steps, K): predictions at P-1..
    top_ids = torch.cat([prompt_top.indices, step_top.indices], 1)  # (B, P+steps-1, K)
    top_logprobs = torch.cat([prompt_top.values, step_top.values], 1)
    sequences = out.sequences.cpu()
    spans = []
    for row, ids in enumerate(batch):
        new = sequences[row, P:].tolist()
        ended = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
        spans.append((P - len(ids), P + ended, len(ids)))  # this row's tokens in the padded sequence
    return assemble_shard(sequences, spans, hidden, top_ids, top_logprobs)


def teacher_forced_shard(model, batch: list[list[int]], prompt_lengths: list[int], settings: ShardSettings) -> dict:
    """One forward pass over given sequences: layer states and the target's top-K per position."""
    import torch

    input_ids, attention = _padded(batch, 0, left=False)
    recorder = _Recorder(model, settings.layers)
    try:
        with torch.inference_mode():
            model.model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device))
    finally:
        recorder.close()
    hidden = {name: calls[0] for name, calls in recorder.calls.items()}
    final = _final(hidden, settings)
    B, T = input_ids.shape
    K = min(settings.top_k, model.get_output_embeddings().weight.shape[0])
    top_ids = torch.zeros((B, T - 1, K), dtype=torch.long)
    top_logprobs = torch.zeros((B, T - 1, K))
    with torch.inference_mode():
        for row, ids in enumerate(batch):  # one row at a time: (T, V) logits, not (B, T, V)
            top = _top_k(model.lm_head(final[row, : len(ids) - 1]), K)
            top_ids[row, : len(ids) - 1], top_logprobs[row, : len(ids) - 1] = top.indices.cpu(), top.values.cpu()
    spans = [(0, len(ids), prompt_length) for ids, prompt_length in zip(batch, prompt_lengths)]
    return assemble_shard(input_ids, spans, hidden, top_ids, top_logprobs)


def _final(hidden: dict, settings: ShardSettings):
    """The final norm's output (B, T, C); it stays in `hidden` as `final` when the settings store it."""
    return hidden["final"] if settings.store_final else hidden.pop("final")


def assemble_shard(tokens, spans: list[tuple[int, int, int]], hidden: dict, top_ids, top_logprobs) -> dict:
    """Pack padded batch tensors into a shard: each row's tokens and its positions that predict one.

    tokens (B, T) padded ids; spans[row] = (first, last, prompt length): the row's tokens are
    tokens[row, first:last]; hidden {"hidden_N": (B, T', C)} and optionally {"final": (B, T', C)}, top_ids/top_logprobs (B, T', K) with
    position j predicting token j + 1. States are stored in their own dtype, fp32 narrowed to fp16.
    """
    import torch

    parts: dict[str, list] = {"tokens": [], "top_ids": [], "top_logprobs": [], **{name: [] for name in hidden}}
    for row, (first, last, _) in enumerate(spans):
        rows = slice(first, last - 1)  # positions that predict a next token
        parts["tokens"].append(tokens[row, first:last].cpu())
        parts["top_ids"].append(top_ids[row, rows].to(torch.int32).cpu())
        parts["top_logprobs"].append(top_logprobs[row, rows].to(torch.float16).cpu())
        for name, states in hidden.items():
            parts[name].append(states[row, rows].to(storage_dtype(states.dtype)).cpu())
    shard = {name: torch.cat(values) for name, values in parts.items()}
    shard["tokens"] = shard["tokens"].to(torch.int32)
    shard["lengths"] = torch.tensor([last - first for first, last, _ in spans], dtype=torch.int32)
    shard["prompt_lengths"] = torch.tensor([prompt for _, _, prompt in spans], dtype=torch.int32)
    return shard


def storage_dtype(dtype):
    """bf16 states stay bf16 (fp16 could overflow them); fp32 and fp16 states are stored as fp16."""
    import torch

    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
