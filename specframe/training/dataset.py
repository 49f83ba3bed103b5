"""`DistillSet`: the distillation shards of one exit layer, as whole sequences for training.

Shapes: S stored positions, B sequences, T positions, C hidden size, K teacher top-K.
"""

from __future__ import annotations

from pathlib import Path

import torch
from attrs import field, frozen

from ..errors import ConfigError

_tensor = dict(eq=False, repr=False)


@frozen
class DistillSet:
    """Layer-N states and teacher top-K of whole sequences.

    Per sequence i: rows `starts[i] .. starts[i] + sizes[i]` of `hidden` (S, C), `top_ids` and
    `top_logprobs` (S, K), and `final` (S, C) when the shards store the last-layer feature;
    row j predicts token j + 1; rows from `answer_from[i]` on are answer
    positions (the rest are prompt positions); `weights[i]` is its loss weight. Build it with
    `from_shards`.
    """

    hidden: torch.Tensor = field(**_tensor)  # (S, C) as stored (fp16 or bf16)
    tokens: torch.Tensor = field(**_tensor)  # every sequence's tokens; sequence i has sizes[i] + 1
    top_ids: torch.Tensor = field(**_tensor)  # (S, K) long
    top_logprobs: torch.Tensor = field(**_tensor)  # (S, K) fp32
    sizes: torch.Tensor = field(**_tensor)  # (N,) rows per sequence
    answer_from: torch.Tensor = field(**_tensor)  # (N,) first answer row per sequence
    weights: torch.Tensor = field(**_tensor)  # (N,) loss weight per sequence
    final: torch.Tensor | None = field(default=None, **_tensor)  # (S, C) last-layer features, if stored
    starts: torch.Tensor = field(init=False, **_tensor)

    def __attrs_post_init__(self):
        object.__setattr__(self, "starts", torch.cumsum(self.sizes, 0) - self.sizes)

    @classmethod
    def from_shards(cls, shards, layer: int, weights=None) -> "DistillSet":
        """The layer-`layer` data of shards (paths of shard files, or shard dicts), with a loss
        weight per shard (default 1)."""
        from safetensors.torch import load_file

        weights = [1.0] * len(shards) if weights is None else list(weights)
        parts: dict[str, list] = {name: [] for name in ("hidden", "tokens", "top_ids", "top_logprobs", "sizes",
                                                         "answer_from", "weights")}
        for shard, weight in zip(shards, weights, strict=True):
            where = str(shard) if isinstance(shard, (str, Path)) else "a shard"
            shard = load_file(str(shard)) if isinstance(shard, (str, Path)) else shard
            key = f"hidden_{layer}"
            if key not in shard:
                raise ConfigError(f"{where} has no states for layer {layer}; its layers are "
                                  f"{sorted(int(k[7:]) for k in shard if k.startswith('hidden_'))}")
            parts["hidden"].append(shard[key])
            parts["tokens"].append(shard["tokens"].long())
            parts["top_ids"].append(shard["top_ids"].long())
            parts["top_logprobs"].append(shard["top_logprobs"].float())
            parts["sizes"].append(shard["lengths"].long() - 1)
            parts["answer_from"].append((shard["prompt_lengths"].long() - 1).clamp(min=0))
            parts["weights"].append(torch.full((len(shard["lengths"]),), float(weight)))
            if "final" in shard:
                parts.setdefault("final", []).append(shard["final"])
        if not parts["hidden"]:
            raise ConfigError("no distillation shards to train on")
        if len(parts.get("final", [])) not in (0, len(parts["hidden"])):
            raise ConfigError("some shards store the last-layer feature and some do not; build all of them with "
                              "--store-final (or --head-kind eagle)")
        return cls(**{name: torch.cat(values) for name, values in parts.items()})

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def answer_positions(self) -> int:
        return int((self.sizes - self.answer_from).sum())

    def sequence_tokens(self, index: int) -> torch.Tensor:
        """(sizes[i] + 1,) tokens of sequence i."""
        start = int(self.starts[index]) + index  # each sequence has one more token than rows
        return self.tokens[start : start + int(self.sizes[index]) + 1]

    def answer_mask(self) -> torch.Tensor:
        """(S,) bool: which rows are answer positions."""
        mask = torch.zeros(self.hidden.shape[0], dtype=torch.bool)
        for start, size, first in zip(self.starts.tolist(), self.sizes.tolist(), self.answer_from.tolist()):
            mask[start + first : start + size] = True
        return mask

    def batches(self, tokens_per_batch: int, generator=None) -> list[list[int]]:
        """Sequence indices grouped by length so that a padded batch holds about tokens_per_batch rows."""
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
        """(B, T, C) fp32 states, (B, T, K) teacher ids and log-probs, (B, T) valid and answer masks, weights."""
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

    def collate_features(self, indices: list[int], device):
        """(B, T, C) fp32 last-layer features of the previous positions (zeros at position 0) and
        (B, T, C) those of the positions themselves, for the sequences `collate` batches."""
        if self.final is None:
            raise ConfigError("these distillation shards hold no last-layer features; rebuild them with "
                              "--store-final (--head-kind eagle stores them)")
        T = int(self.sizes[indices].max())
        own = torch.zeros(len(indices), T, self.final.shape[1])
        for row, index in enumerate(indices):
            start, size = int(self.starts[index]), int(self.sizes[index])
            own[row, :size] = self.final[start : start + size].float()
        return previous_positions(own).to(device), own.to(device)


def previous_positions(features: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, T, C) shifted one position right, zeros at position 0."""
    return torch.cat([torch.zeros_like(features[:, :1]), features[:, :-1]], 1)
