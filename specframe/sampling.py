"""Turning logits into the distributions p (target) and q (drafter), and drawing from them.

The same function processes both, so temperature, top-k and top-p are applied identically to
p and q, which speculative sampling needs to be exact.
"""

from __future__ import annotations

import torch

from .types import SamplingConfig

_SMALLEST_TEMPERATURE = torch.finfo(torch.float32).tiny  # below this T as a float32 may round to 0


def probs_from_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """(T, V) logits -> (T, V) probabilities after temperature, top-k and top-p: float32, or
    float64 for float64 logits (the exact checks of `specframe.testing` use float64 toy models).

    At temperature 0 the result is one-hot on the argmax, so greedy decoding is the special case
    of sampling where every distribution is a point mass.

    Each row's maximum is subtracted before dividing by the temperature (softmax does not change
    under that shift), so a tiny temperature cannot overflow to inf and give NaN: the scaled
    logits are <= 0 with the maximum at 0. A temperature too small even for that (below the
    smallest normal float32, where T would round to 0 and 0/0 is NaN) takes the limit T -> 0:
    uniform over the tokens tied at the maximum, which is what larger tiny temperatures give.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if config.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    peak = logits.amax(-1, keepdim=True)  # (T, 1)
    if config.temperature < _SMALLEST_TEMPERATURE:
        logits = torch.zeros_like(logits).masked_fill(logits < peak, float("-inf"))
    else:
        logits = (logits - peak) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]  # (T, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        logits = _top_p_filter(logits, config.top_p)
    return torch.softmax(logits, dim=-1)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class Sampler:
    """Processes logits and draws tokens, with one seeded generator for the whole generation."""

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.generator = torch.Generator(device=device)
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.config.greedy

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return probs_from_logits(logits, self.config)

    def sample(self, probs: torch.Tensor) -> int:
        """Draw one token from a (V,) distribution (argmax when greedy)."""
        if self.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.generator.device))
