"""`check_controller`: the contract (through `specframe.checks`, as the engine checks it) and
lossless decoding under the controller's choices of draft length."""

from __future__ import annotations

import random

from ..checks import check_keep_drafting, check_max_draft
from ..plugins import PluginRegistry
from ..types import RoundStats
from .common import (KitSettings, check_distribution, check_greedy, factory, reference_verifier,
                     registry_or_default)
from .report import ConformanceReport, run_checks
from .toys import TableDrafter, TableLM


def controller_contract(make, settings: KitSettings, name: str, rounds: int = 200) -> str:
    """Drive the controller through random rounds, checking what it returns each time."""
    controller, rng = make(), random.Random(settings.seed)
    asked = []
    for generation in range(3):
        controller.begin()
        for _ in range(rounds):
            k = check_max_draft(controller.max_draft(), name, limit=settings.max_draft_cap)
            asked.append(k)
            confidences: list[float] = []
            while len(confidences) < min(k, 8):
                confidences.append(rng.random())
                if not check_keep_drafting(controller.keep_drafting(len(confidences), confidences[-1]), name):
                    break
            drafted = len(confidences)
            accepted = drafted if rng.random() < 0.3 else rng.randint(0, drafted)
            controller.update(RoundStats(drafted, accepted, tuple(confidences), rng.random() / 100, rng.random() / 50))
    mean = sum(asked) / len(asked)
    return f"max_draft() over {len(asked)} rounds: min {min(asked)}, mean {mean:.1f}, max {max(asked)}"


def check_controller(name: str, registry: PluginRegistry | None = None, *, options: dict | None = None,
                     settings: KitSettings | None = None, only: tuple[str, ...] | None = None,
                     raise_on_failure: bool = True, **more_options) -> ConformanceReport:
    """Check the controller registered as `name`. `only`: check ids, of contract, greedy, sampling."""
    settings = settings or KitSettings()
    registry = registry_or_default(registry)
    make, plugin = factory(registry, "controller", name, {**(options or {}), **more_options})
    names = {"drafter": "conformance-kit", "controller": name, "verifier": "auto"}
    table = TableLM.random(settings.vocab_size, settings.seed, min_support=2)
    greedy_parts = lambda: (TableDrafter.near(table, sample=False), make(), reference_verifier())  # noqa: E731
    sampled_parts = lambda: (TableDrafter.near(table), make(), reference_verifier())  # noqa: E731
    checks = [
        ("contract", "max_draft is an int in bounds, keep_drafting a bool, update takes any RoundStats",
         lambda: controller_contract(make, settings, name)),
        ("greedy", "lossless greedy decoding", lambda: check_greedy(table, greedy_parts, settings, names)),
        ("sampling", "lossless sampling (exact sequence distribution)",
         lambda: check_distribution(table, sampled_parts, settings, names)),
    ]
    report = run_checks("controller", name, plugin, checks, only)
    return report.raise_for_failures() if raise_on_failure else report
