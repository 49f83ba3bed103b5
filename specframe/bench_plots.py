"""PNG plots of `specframe bench` results. Needs matplotlib: `pip install 'specframe[bench]'`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

MIN_DRAFTED = 5  # hide draft positions drafted fewer times than this (too noisy to read)


def write_plots(out: Path, summary: dict) -> list[str]:
    """Write the plots that have data; return their paths."""
    written = []
    for name, draw in (("speedup_by_category.png", _speedup_by_category),
                       ("acceptance_by_position.png", _acceptance_by_position),
                       ("draft_lengths.png", _draft_lengths)):
        figure = draw(summary)
        if figure is None:
            continue
        path = Path(out) / name
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(str(path))
    return written


def _speedup_by_category(summary: dict):
    base = summary["baseline"]
    labels = [k for k in summary["methods"] if k != base]
    if not labels:
        return None
    groups = summary["categories"] + ["all"]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(labels)) ** 0.5 + 2), 4.2))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        method = summary["methods"][label]
        entries = [method["by_category"][c] for c in summary["categories"]] + [method]
        means = [e["speedup"]["mean"] or 0.0 for e in entries]
        errors = [e["speedup"]["ci"] or 0.0 for e in entries]
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        axes.bar(xs, means, width, yerr=errors, capsize=2, label=label)
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes.set_ylabel(f"speedup vs {base} (×)")
    axes.set_title("Speedup by category (mean of per-prompt ratios, 95 % CI)")
    axes.legend(fontsize=8)
    return figure


def _acceptance_by_position(summary: dict):
    series = {k: m["position_accepts"] for k, m in summary["methods"].items() if m.get("position_accepts")}
    if not series:
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for label, positions in series.items():
        points = [(i + 1, a / d) for i, (a, d) in enumerate(positions) if d >= MIN_DRAFTED]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set_xlabel("draft position")
    axes.set_ylabel("acceptance rate")
    axes.set_ylim(0, 1.02)
    axes.set_title("Acceptance by draft position")
    axes.legend(fontsize=8)
    return figure


def _draft_lengths(summary: dict):
    """Draft-length histograms of Thompson-controlled methods (else of every drafting method)."""
    drafting = {k: m for k, m in summary["methods"].items() if m.get("draft_length_histogram") and m.get("position_accepts")}
    thompson = {k: m for k, m in drafting.items() if "thompson" in k}
    chosen = thompson or drafting
    if not chosen:
        return None
    figure, axes = plt.subplots(1, len(chosen), figsize=(3.6 * len(chosen) + 0.6, 3.4), squeeze=False)
    for axis, (label, method) in zip(axes[0], chosen.items()):
        histogram = {int(k): v for k, v in method["draft_length_histogram"].items()}
        axis.bar(list(histogram), list(histogram.values()))
        axis.set_xticks(sorted(histogram))
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("tokens drafted in a round")
    axes[0][0].set_ylabel("rounds")
    figure.suptitle("Draft lengths" + (" (Thompson controllers)" if thompson else ""))
    figure.tight_layout()
    return figure
