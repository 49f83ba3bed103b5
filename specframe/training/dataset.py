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
    top_ids: torch.Tensor = field(**_tensor)  # (S, K) as stored (int32)
    top_logprobs: torch.Tensor = field(**_tensor)  # (S, K) as stored (fp16)
    sizes: torch.Tensor = field(**_tensor)  # (N,) rows per sequence
    answer_from: torch.Tensor = field(**_tensor)  # (N,) first answer row per sequence
    weights: torch.Tensor = field(**_tensor)  # (N,) loss weight per sequence
    final: torch.Tensor | None = field(default=None, **_tensor)  # (S, C) last-layer features, if stored
    starts: torch.Tensor = field(init=False, **_tensor)

    def __attrs_post_init__(self):
        object.__setattr__(self, "starts", torch.cumsum(self.sizes, 0) - self.sizes)

    @classmethod
    def from_shards(cls, shards, layer: int, weights=None, features: bool = True) -> "DistillSet":
        """The layer-`layer` data of shards (paths of shard files, or shard dicts), with a loss
        weight per shard (default 1), and their last-layer features if stored and `features`.

        Tensors keep their stored dtypes (states bf16 or fp16, ids int32, log-probs fp16; `collate`
        widens one batch at a time) and are copied once into tensors sized for all shards, so
        2 M positions take about 5 GB, not twice that while loading.
        """
        weights = [1.0] * len(shards) if weights is None else list(weights)
        if len(weights) != len(shards):
            raise ConfigError(f"{len(weights)} shard weights for {len(shards)} shards")
        sources = [_ShardSource(shard) for shard in shards]
        if not sources:
            raise ConfigError("no distillation shards to train on")
        for source in sources:
            source.check_layer(layer)
        has_final = ["final" in source.keys for source in sources]
        if any(has_final) and not all(has_final):
            raise ConfigError("some shards store the last-layer feature and some do not; build all of them with "
                              "--store-final (or --head-kind eagle)")
        columns = {"hidden": f"hidden_{layer}", "tokens": "tokens", "top_ids": "top_ids",
                   "top_logprobs": "top_logprobs", **({"final": "final"} if all(has_final) and features else {})}
        data = {name: _concatenated(sources, key) for name, key in columns.items()}
        lengths = torch.cat([source.get("lengths").long() for source in sources])
        prompt_lengths = torch.cat([source.get("prompt_lengths").long() for source in sources])
        per_sequence = torch.cat([torch.full((source.rows("lengths"),), float(weight))
                                  for source, weight in zip(sources, weights)])
        return cls(**data, sizes=lengths - 1, answer_from=(prompt_lengths - 1).clamp(min=0), weights=per_sequence)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def answer_positions(self) -> int:
        return int((self.sizes - self.answer_from).sum())

    def sequence_tokens(self, index: int) -> torch.Tensor:
        """(sizes[i] + 1,) tokens of sequence i."""
        start = int(self.starts[index]) + index  # each sequence has one more token than rows
        return self.tokens[start : start + int(self.sizes[index]) + 1].long()

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
        """(B, T, C) fp32 states, (B, T, K) long teacher ids and fp32 log-probs, (B, T) valid and
        answer masks, weights."""
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
            hidden[row, :size] = self.hidden[start : start + size]  # copy_ widens to fp32
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
            own[row, :size] = self.final[start : start + size]
        return previous_positions(own).to(device), own.to(device)


def previous_positions(features: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, T, C) shifted one position right, zeros at position 0."""
    return torch.cat([torch.zeros_like(features[:, :1]), features[:, :-1]], 1)


class _ShardSource:
    """One shard, a file (read tensor by tensor, shapes from its header) or a dict of tensors."""

    def __init__(self, shard):
        if isinstance(shard, (str, Path)):
            from safetensors import safe_open

            self.where, self._file = str(shard), safe_open(str(shard), "pt")
            self.keys = set(self._file.keys())
        else:
            self.where, self._file, self._dict = "a shard", None, shard
            self.keys = set(shard)

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key) if self._file is not None else self._dict[key]

    def rows(self, key: str) -> int:
        return self._file.get_slice(key).get_shape()[0] if self._file is not None else len(self._dict[key])

    def check_layer(self, layer: int) -> None:
        if f"hidden_{layer}" not in self.keys:
            raise ConfigError(f"{self.where} has no states for layer {layer}; its layers are "
                              f"{sorted(int(k[7:]) for k in self.keys if k.startswith('hidden_'))}")


def _concatenated(sources: list[_ShardSource], key: str) -> torch.Tensor:
    """torch.cat of every source's `key`, copied into one tensor allocated up front."""
    total = sum(source.rows(key) for source in sources)
    out, offset = None, 0
    for source in sources:
        part = source.get(key)
        if out is None:
            out = torch.empty((total, *part.shape[1:]), dtype=part.dtype)
        elif part.dtype != out.dtype:  # mixed stored dtypes (fp16 and bf16 states): widen to a common one
            out = out.to(torch.promote_types(out.dtype, part.dtype))
        out[offset : offset + len(part)] = part
        offset += len(part)
    return out
