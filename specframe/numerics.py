"""What "lossless" means per dtype, and whether a greedy divergence is a numerical near-tie.

A verification pass over K + 1 tokens and a one-token pass add up the same products in a
different order. In fp32 on CPU the two agree bit for bit, and in bf16 on CPU where specframe's
compiled kernels run (specframe.kernels); elsewhere in bf16 and fp16 they round apart by a few
units in the last place, so where the target's two best tokens are that close, the pass over
several tokens may pick the other one (docs/numerics.md).

`judge_divergence` recomputes the logits at the first position where two greedy outputs part,
from the same prefix in one plain forward pass, and measures how far the two tokens there are
below the best logit, in steps of the model's dtype: a *step* is the spacing of representable
numbers at that logit's magnitude (eps(dtype) * 2^floor(log2 |logit|); for bf16 at logits of
16-32 it is 0.125). A divergence is a near-tie when both tokens lie within NEAR_TIE_STEPS[dtype]
steps of the best logit.
"""

from __future__ import annotations

import math

import torch
from attrs import frozen

# the near-tie bound in steps of each dtype (docs/numerics.md): in bf16 another split of the same sequence
# moved a top-2 gap by <= 5 steps over 804 positions; fp32's accumulation order moved logits by <= 21 steps
NEAR_TIE_STEPS = {"bf16": 6, "fp16": 6, "fp32": 64}

GUARANTEES = {  # one sentence per dtype; README, docs/numerics.md and `--help` carry exactly these
    "fp32": "fp32: greedy output is token-for-token equal to plain greedy decoding and to Hugging Face "
            "`generate`; sampled output follows exactly the distribution of plain sampling.",
    "bf16/fp16": "bf16/fp16: sampling is exact in distribution with respect to the logits the verification "
                 "pass computes; greedy output equals plain greedy output except at numerical near-ties, "
                 "because a pass over several tokens rounds differently from a one-token pass.",
}


def guarantee(dtype: torch.dtype) -> str:
    return GUARANTEES["fp32" if dtype == torch.float32 else "bf16/fp16"]


def exactness(dtype: torch.dtype, greedy: bool, lossless: bool = True) -> str:
    """A few words for a statistics line: is this output token-exact?"""
    if not lossless:
        return "lossy verifier: not exact"
    if not greedy:
        return "sampled: exact in distribution"
    if dtype == torch.float32:
        return "greedy: token-exact"
    return "greedy: equal to plain decoding except at near-ties"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def step(value: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype` numbers at |value| (one unit in the last place)."""
    magnitude = max(abs(value), torch.finfo(dtype).tiny)
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


@frozen
class Divergence:
    """The first position where greedy output `got` parts from `expected`, judged on recomputed logits."""

    position: int  # index among the new tokens
    expected_token: int
    got_token: int
    best_logit: float  # the recomputed maximum over the vocabulary
    expected_logit: float
    got_logit: float
    dtype: str

    @property
    def gap(self) -> float:
        """How far the lower of the two tokens is below the best logit (the top-2 gap when they are the top two)."""
        return self.best_logit - min(self.expected_logit, self.got_logit)

    @property
    def steps(self) -> float:
        return self.gap / step(self.best_logit, _DTYPES[self.dtype])

    @property
    def near_tie(self) -> bool:
        return self.steps <= NEAR_TIE_STEPS[self.dtype]

    def describe(self) -> str:
        verdict = "near-tie" if self.near_tie else "CLEAR MARGIN"
        return (f"{verdict}: new token {self.position}, {self.expected_token} ({self.expected_logit:.4g}) vs "
                f"{self.got_token} ({self.got_logit:.4g}), gap {self.gap:.4g} = {self.steps:.1f} {self.dtype} steps")

    def as_dict(self) -> dict:
        return {"position": self.position, "near_tie": self.near_tie, "gap": self.gap, "steps": self.steps,
                "dtype": self.dtype, "tokens": [self.expected_token, self.got_token],
                "logits": [self.expected_logit, self.got_logit], "best_logit": self.best_logit}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def first_divergence(expected: list[int], got: list[int]) -> int | None:
    """The first index where both lists hold a token and differ (None: one is a prefix of the other)."""
    return next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)


@torch.inference_mode()
def judge_divergence(model, prompt_ids: list[int], expected: list[int], got: list[int]) -> Divergence | None:
    """Recompute the logits after prompt + the shared prefix in one forward pass of `model` (in its
    own dtype) and judge the first divergence; None when the outputs do not part."""
    position = first_divergence(expected, got)
    if position is None:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(expected[:position])], device=device)
    logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()  # (V,)
    a, b = expected[position], got[position]
    return Divergence(position, a, b, float(logits.max()), float(logits[a]), float(logits[b]),
                      dtype_name(model.dtype))
