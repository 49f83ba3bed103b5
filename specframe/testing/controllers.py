"""`check_controller`: the contract (through `specframe.checks`, as the engine checks it) and
lossless decoding under the controller's choices of draft length."""

from __future__ import annotations

import random

from ..checks import check_keep_drafting, check_max_draft, check_tree_width
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
            if hasattr(controller, "tree_width"):
                check_tree_width(controller.tree_width(), name)
            asked.append(k)
            confidences: list[float] = []
            while len(confidences) < min(k, 8):
                confidences.append(rng.random())
                if not check_keep_drafting(controller.keep_drafting(len(confidences), confidences[-1]), name):
                    break
            drafted = len(confidences)
            accepted = drafted if rng.random() < 0.3 else rng.randint(0, drafted)
            stats = RoundStats(drafted, accepted, tuple(confidences), rng.random() / 100, rng.random() / 50)
            if drafted and rng.random() < 0.3:  # some rounds drafted a tree: every controller must take them
                stats = _as_tree(stats, rng)
            controller.update(stats)
    mean = sum(asked) / len(asked)
    return f"max_draft() over {len(asked)} rounds: min {min(asked)}, mean {mean:.1f}, max {max(asked)}"


def _as_tree(stats: RoundStats, rng: random.Random) -> RoundStats:
    """The round as a fixed tree (drafters/tree_drafting.py): its chain and one candidate beside each
    chain draft, with a random accepted path."""
    depth = stats.drafted
    parents = (*range(-1, depth - 1), *range(-1, depth - 1))
    kept = min(stats.accepted, depth)
    path = tuple(range(kept)) + ((depth + kept,) if kept < depth and rng.random() < 0.5 else ())
    return RoundStats(2 * depth, len(path), stats.confidences * 2, stats.draft_seconds, stats.verify_seconds,
                      parents, path)


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
