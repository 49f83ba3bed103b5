"""Timing the target's forward passes and a drafter's real step, through specframe's own paths.

Used by `specframe costs` and by `specframe train` (the draft cost it records with a head).
"""

from __future__ import annotations

import statistics
import time

import torch

from .cost_model import summarize
from .sampling import Sampler
from .target import TargetModel
from .types import SamplingConfig


class _OneDraft:
    """A controller that stops the drafter after one token: one draft step per call."""

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return False


def measure(model, sizes: list[int], context: int, repeats: int, drafter=None) -> dict:
    """Median milliseconds of one target pass per size in `sizes` (new tokens) and, with a
    `drafter`, of one `drafter.propose` step, all timed round-robin at a context of `context`
    random tokens. The drafter is set up as the engine does (before_prefill, prefill, begin)."""
    target = TargetModel(model)
    generator = torch.Generator().manual_seed(0)
    low = min(100, target.vocab_size // 2)  # skip special tokens at the start of large vocabularies
    ids = torch.randint(low, min(20000, target.vocab_size), (context + max(sizes),), generator=generator)
    prompt = ids[:context].tolist()
    if drafter is not None and hasattr(drafter, "before_prefill"):
        drafter.before_prefill(target, prompt)
    target.forward(ids[:context], logits_to_keep=1)
    sampler = Sampler(SamplingConfig(0.0), device=target.device)
    timers = {t: (lambda t=t: _full_pass(target, ids[context : context + t], context)) for t in sizes}
    if drafter is not None:
        drafter.begin(target, prompt, sampler)
        pending = [*prompt, int(ids[context])]
        timers["draft"] = lambda: _draft_step(target, drafter, pending, sampler)
    ms = _median_ms(timers, repeats)
    return summarize(ms, sizes)


def _full_pass(target: TargetModel, new_ids: torch.Tensor, context: int) -> None:
    target.forward(new_ids)
    target.rollback(context)


def _draft_step(target: TargetModel, drafter, pending: list[int], sampler: Sampler) -> None:
    drafter.propose(list(pending), 1, _OneDraft(), sampler)
    valid = len(pending) - 1
    target.rollback(valid)
    drafter.rollback(valid)


def _median_ms(timers: dict, repeats: int) -> dict:
    """One untimed warm-up call each, then `repeats` rounds of one call each, interleaved."""
    times = {name: [] for name in timers}
    for fn in timers.values():
        fn()
    for _ in range(repeats):
        for name, fn in timers.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def early_exit_drafter(head):
    """The built-in `early_exit` drafter on an EarlyExitHead already loaded (training times its head)."""
    from .plugins import get_registry

    return get_registry().create("drafter", "early_exit", {"head": head})
