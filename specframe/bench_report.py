"""Summaries of `specframe bench` results: statistics, the Markdown report and summary.json.

Speedup is the mean over prompts of (method tokens/s) / (baseline tokens/s) on the same prompt
and repeat (repeats of one prompt are averaged first), with a two-sided 95 % Student-t interval.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

from .numerics import NEAR_TIE_STEPS

# two-sided 95 % Student-t quantiles t(0.975, df) for df = 1..30
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
_T95_TAIL = ((30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960))
POSITIONS_SHOWN = 8
NEAR_TIES_FILE = "near_ties.json"


def t_critical(df: int) -> float:
    """t(0.975, df); above 30 interpolated linearly in 1/df between table rows."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= 30:
        return _T95[df - 1]
    for (d0, t0), (d1, t1) in zip(_T95_TAIL, _T95_TAIL[1:]):
        if df <= d1:
            x0, x1, x = 1 / d0, (1 / d1 if d1 != math.inf else 0.0), 1 / df
            return t0 + (t1 - t0) * (x - x0) / (x1 - x0)
    return 1.960


def mean_ci(values: list[float]) -> dict:
    """Mean and 95 % confidence half-width (None when n < 2) of a sample."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci": t_critical(n - 1) * sd / math.sqrt(n), "n": n}


# ---- summarising --------------------------------------------------------------------------------
def latest_records(records: list[dict], labels: list[str], prompt_ids: set[str]) -> dict[tuple, dict]:
    """(prompt_id, method, repeat) -> its last successful record, for the methods and prompts asked."""
    chosen = {}
    for record in records:
        key = (str(record.get("prompt_id")), record.get("method"), record.get("repeat"))
        if record.get("error") or key[1] not in labels or key[0] not in prompt_ids:
            continue
        chosen[key] = record
    return chosen


def summarize(records: list[dict], labels: list[str], baseline: str, categories: dict[str, str],
              greedy: bool, near_ties: dict | None = None) -> dict:
    """Statistics per method, overall and per category. `categories` maps prompt id -> category;
    `near_ties` maps mismatch_key(record) -> a `Divergence.as_dict()` (see `judge_mismatches`)."""
    chosen = latest_records(records, labels, set(categories))
    errors = Counter(r.get("method") for r in records if r.get("error"))
    order = list(dict.fromkeys(categories.values()))
    summary = {"baseline": baseline, "greedy": greedy, "categories": order, "methods": {},
               "dtypes": sorted({r["dtype"] for r in chosen.values() if r.get("dtype")})}
    for label in labels:
        mine = {k: r for k, r in chosen.items() if k[1] == label}
        entry = _method_stats(mine.values(), chosen, baseline, label, greedy)
        _add_near_ties(entry, label, near_ties or {})
        entry["errors"] = errors.get(label, 0)
        entry["by_category"] = {
            c: _method_stats([r for r in mine.values() if categories[str(r["prompt_id"])] == c],
                             chosen, baseline, label, greedy, brief=True)
            for c in order
        }
        summary["methods"][label] = entry
    return summary


def _method_stats(records, chosen: dict, baseline: str, label: str, greedy: bool, brief: bool = False) -> dict:
    records = list(records)
    tokens = sum(r["new_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    stats = [r["stats"] for r in records if r.get("stats")]
    engine = [s for s in stats if "drafted" in s]  # specframe's own statistics (HF gives rounds only)
    entry = {
        "generations": len(records),
        "prompts": len({str(r["prompt_id"]) for r in records}),
        "new_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds else None,
        "speedup": mean_ci(_per_prompt_ratios(records, chosen, baseline)),
        "mean_accepted_length": _ratio(sum(s["new_tokens"] for s in stats), sum(map(_target_passes, stats))),
        **_mismatches(records, chosen, baseline, label, greedy),
    }
    if brief:
        return entry
    entry["acceptance_rate"] = _ratio(sum(s["accepted"] for s in engine), sum(s["drafted"] for s in engine))
    entry["position_accepts"] = _sum_positions(engine)
    entry["draft_length_histogram"] = _sum_histograms(s.get("draft_length_histogram", {}) for s in engine)
    entry["time_split"] = _time_split(engine)
    entry["peak_rss_mib"] = max((r.get("peak_rss_mib") or 0 for r in records), default=None)
    entry["peak_cuda_mib"] = max((r.get("peak_cuda_mib") or 0 for r in records), default=None) or None
    entry["finish_reasons"] = dict(Counter(r.get("finish_reason") for r in records))
    entry["fallbacks"] = sum(1 for s in engine if s.get("fallback"))
    entry["tree_shape"] = _tree_shape(engine)
    return entry


def _tree_shape(engine: list[dict]) -> dict | None:
    """Per round: how many rounds drafted a tree, nodes and depth per drafting round (None: no trees)."""
    trees = sum(s.get("tree_rounds", 0) for s in engine)
    if not trees:
        return None
    rounds = sum(s["rounds"] for s in engine)
    drafting = rounds - sum(s.get("draft_length_histogram", {}).get("0", 0) for s in engine)
    return {"tree_rounds": _ratio(trees, drafting), "nodes": _ratio(sum(s["drafted"] for s in engine), drafting),
            "depth": _ratio(sum(s.get("drafted_depth", s["drafted"]) for s in engine), drafting)}


def _per_prompt_ratios(records, chosen: dict, baseline: str) -> list[float]:
    ratios: dict[str, list[float]] = {}
    for r in records:
        base = chosen.get((str(r["prompt_id"]), baseline, r["repeat"]))
        if base and base.get("tokens_per_second") and r.get("tokens_per_second") is not None:
            ratios.setdefault(str(r["prompt_id"]), []).append(r["tokens_per_second"] / base["tokens_per_second"])
    return [sum(v) / len(v) for v in ratios.values()]


def first_difference(mine: list[int], theirs: list[int]) -> int | None:
    """The first position where two token lists differ (the shorter length if one is a prefix
    of the other), or None when they are equal."""
    if mine == theirs:
        return None
    return next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))


def _mismatches(records, chosen: dict, baseline: str, label: str, greedy: bool) -> dict:
    """At temperature 0: how many generations differ from the baseline's, and where they first do."""
    if not greedy or label == baseline:
        return {"compared": 0, "mismatches": None, "mismatch_examples": []}
    compared, examples = 0, []
    for r in records:
        base = chosen.get((str(r["prompt_id"]), baseline, r["repeat"]))
        if base is None:
            continue
        compared += 1
        mine, theirs = r.get("tokens", []), base.get("tokens", [])
        first = first_difference(mine, theirs)
        if first is not None:
            examples.append({"prompt_id": str(r["prompt_id"]), "repeat": r["repeat"], "first_difference": first,
                             "lengths": [len(mine), len(theirs)]})
    return {"compared": compared, "mismatches": len(examples), "mismatch_examples": examples}


def mismatch_key(prompt_id, method: str, repeat) -> str:
    return f"{prompt_id}|{method}|{repeat}"


def _add_near_ties(entry: dict, label: str, near_ties: dict) -> None:
    """Attach each mismatch's near-tie verdict, where one was computed, and count the near-ties."""
    judged = 0
    for example in entry["mismatch_examples"]:
        verdict = near_ties.get(mismatch_key(example["prompt_id"], label, example["repeat"]))
        if verdict is not None:
            example["near_tie"] = verdict
            judged += verdict["near_tie"]
    if entry["mismatch_examples"] and near_ties:
        entry["near_ties"] = judged


def judge_mismatches(model, ids: dict[str, list[int]], records: list[dict], baseline: str) -> dict:
    """For each greedy output that parts from the baseline's on the same prompt and repeat: the
    near-tie verdict at its first divergence (`specframe.numerics.judge_divergence`), recomputed
    on `model`. Keys are mismatch_key(...); outputs where one is a prefix of the other are left out."""
    from .numerics import judge_divergence

    chosen = {(str(r["prompt_id"]), r["method"], r["repeat"]): r for r in records if not r.get("error")}
    verdicts = {}
    for (prompt_id, method, repeat), record in chosen.items():
        base = chosen.get((prompt_id, baseline, repeat))
        if method == baseline or base is None or prompt_id not in ids:
            continue
        verdict = judge_divergence(model, ids[prompt_id], base.get("tokens", []), record.get("tokens", []))
        if verdict is not None:
            verdicts[mismatch_key(prompt_id, method, repeat)] = verdict.as_dict()
    return verdicts


def _target_passes(stats: dict) -> int:
    """Target forward passes of one generation, prefill included (as HF's count is).

    HF records count every pass; specframe's engine counts rounds after the prefill, which
    itself commits the first token.
    """
    engine = "drafted" in stats
    return stats["rounds"] + (1 if engine and stats["new_tokens"] else 0)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _sum_positions(stats: list[dict]) -> list[list[int]]:
    """Per draft position: [accepted, drafted] summed over generations."""
    total: list[list[int]] = []
    for s in stats:
        for i, (accepted, drafted) in enumerate(s.get("position_accepts", [])):
            if i == len(total):
                total.append([0, 0])
            total[i][0] += accepted
            total[i][1] += drafted
    return total


def _sum_histograms(histograms) -> dict[str, int]:
    total: Counter = Counter()
    for histogram in histograms:
        total.update({int(k): v for k, v in histogram.items()})
    return {str(k): total[k] for k in sorted(total)}


def _time_split(stats: list[dict]) -> dict | None:
    total = sum(s["total_seconds"] for s in stats)
    if not total:
        return None
    return {part: sum(s[f"{part}_seconds"] for s in stats) / total for part in ("draft", "verify", "other")}


# ---- Markdown -----------------------------------------------------------------------------------
def _fmt(value, pattern: str = "{:.2f}", missing: str = "–") -> str:
    return missing if value is None else pattern.format(value)


def _speedup(entry: dict) -> str:
    speedup = entry["speedup"]
    if speedup["mean"] is None:
        return "–"
    ci = f" ± {speedup['ci']:.2f}" if speedup["ci"] is not None else ""
    return f"{speedup['mean']:.2f}×{ci}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(summary: dict, config: dict, plots: list[str], note: str = "") -> str:
    base, methods = summary["baseline"], summary["methods"]
    lines = ["# specframe bench", ""]
    lines += [f"- **{k}**: {config[k]}" for k in ("command", "machine", "versions", "model", "dtype", "device",
                                                   "threads", "dataset", "categories", "limit", "max_new_tokens",
                                                   "temperature", "top_k", "top_p", "seed", "repeats")
              if config.get(k) not in (None, "")]
    prompts = max((m["prompts"] for m in methods.values()), default=0)
    lines += [f"- **prompts**: {prompts} in {len(summary['categories'])} categories; baseline **{base}**", ""]
    if note:
        lines += [note, ""]
    lines += ["## Overall", "",
              f"Speedup: mean over prompts of tokens/s ÷ {base}'s tokens/s on the same prompt, ± the 95 % "
              "confidence half-width. Accepted length: tokens committed per target forward pass (Spec-Bench's "
              "count, the target's own token included). Time split: draft / verify / other.", ""]
    rows = [[f"`{label}`", _fmt(m["tokens_per_second"], "{:.1f}"), "1 (baseline)" if label == base else _speedup(m),
             _fmt(m["mean_accepted_length"]), _fmt(m["acceptance_rate"], "{:.0%}"), _split(m["time_split"]),
             _fmt(m["peak_rss_mib"], "{:.0f} MiB"), _mismatch_cell(m), str(m["generations"]) +
             (f" ({m['errors']} errors)" if m["errors"] else "")] for label, m in methods.items()]
    lines += _table(["method", "tokens/s", f"speedup vs {base}", "accepted length", "acceptance",
                     "draft / verify / other", "peak RSS", "greedy mismatches", "generations"], rows)
    lines += ["", "## Speedup by category", ""]
    lines += _category_table(summary, _speedup)
    lines += ["", "## Tokens per second by category", ""]
    lines += _category_table(summary, lambda e: _fmt(e["tokens_per_second"], "{:.1f}"))
    lines += _acceptance_tables(methods)
    lines += ["", "## Losslessness", "", *_losslessness(summary)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _split(split: dict | None) -> str:
    return "–" if not split else " / ".join(f"{split[k]:.0%}" for k in ("draft", "verify", "other"))


def _mismatch_cell(entry: dict) -> str:
    if entry["mismatches"] is None:
        return "–"
    ties = f" ({entry['near_ties']} near-ties)" if "near_ties" in entry else ""
    return f"{entry['mismatches']} / {entry['compared']}{ties}"


def _category_table(summary: dict, cell) -> list[str]:
    labels = list(summary["methods"])
    rows = []
    for category in summary["categories"]:
        entries = [summary["methods"][label]["by_category"][category] for label in labels]
        rows.append([category, str(max(e["prompts"] for e in entries))] + [cell(e) for e in entries])
    rows.append(["**all**", str(max(m["prompts"] for m in summary["methods"].values()))]
                + [cell(m) for m in summary["methods"].values()])
    return _table(["category", "n"] + [f"`{label}`" for label in labels], rows)


def _acceptance_tables(methods: dict) -> list[str]:
    drafting = {k: m for k, m in methods.items() if m.get("position_accepts")}
    if not drafting:
        return []
    width = min(POSITIONS_SHOWN, max(len(m["position_accepts"]) for m in drafting.values()))
    lines = ["", "## Acceptance by draft position", "",
             "Share of rounds that drafted at least i tokens in which draft i was accepted (with all before it).", ""]
    rows = [[f"`{k}`"] + [_fmt(_ratio(*m["position_accepts"][i]) if i < len(m["position_accepts"]) else None,
                               "{:.0%}") for i in range(width)] for k, m in drafting.items()]
    lines += _table(["method"] + [str(i + 1) for i in range(width)], rows)
    trees = {k: m["tree_shape"] for k, m in drafting.items() if m.get("tree_shape")}
    if trees:
        lines += ["", "## Token trees", "", "Share of the rounds that drafted which drafted a tree; nodes and depth per round that "
                  "drafted (a chain's depth is its length; positions above are depths).", ""]
        lines += _table(["method", "tree rounds", "nodes", "depth"], [
            [f"`{k}`", _fmt(t["tree_rounds"], "{:.0%}"), _fmt(t["nodes"]), _fmt(t["depth"])] for k, t in trees.items()])
    lengths = sorted({int(n) for m in drafting.values() for n in m["draft_length_histogram"]})
    lines += ["", "## Draft lengths", "", "Rounds per number of drafted tokens (a tree's nodes).", ""]
    rows = [[f"`{k}`"] + [str(m["draft_length_histogram"].get(str(n), 0)) for n in lengths] for k, m in drafting.items()]
    return lines + _table(["method"] + [str(n) for n in lengths], rows)


def _losslessness(summary: dict) -> list[str]:
    if not summary["greedy"]:
        return ["Sampled run (temperature > 0): outputs are random, so tokens are not compared. Lossless "
                "speculative sampling keeps the output distribution; check it with the test suite."]
    base, lines = summary["baseline"], []
    total = sum(m["mismatches"] or 0 for m in summary["methods"].values())
    lines.append(f"Greedy decoding: every generation compared token by token with `{base}` on the same prompt"
                 f"{_dtype_clause(summary.get('dtypes', []))}. "
                 + ("**All identical.**" if total == 0 else f"**{total} generations differ.**"))
    if total:
        lines.append(f"A mismatch is a *near-tie* when, recomputed from the same prefix, both tokens lie within "
                     f"{NEAR_TIE_STEPS['bf16']} bf16/fp16 or {NEAR_TIE_STEPS['fp32']} fp32 steps (units in the "
                     "last place) of the best logit; "
                     "docs/numerics.md says why bf16 and fp16 allow these and fp32 does not.")
    for label, m in summary["methods"].items():
        for example in m["mismatch_examples"][:5]:
            lines.append(f"- `{label}` prompt {example['prompt_id']} (repeat {example['repeat']}): first differs at "
                         f"new token {example['first_difference']}; lengths {example['lengths'][0]} vs "
                         f"{example['lengths'][1]}{_tie_words(example.get('near_tie'))}")
        if len(m["mismatch_examples"]) > 5:
            lines.append(f"- `{label}`: {len(m['mismatch_examples']) - 5} more")
    return lines


def _dtype_clause(dtypes: list[str]) -> str:
    if len(dtypes) > 1:
        return (f", **across dtypes ({', '.join(dtypes)})**: records of different dtypes are compared, so "
                "differences may come from the dtype, not from the method")
    return f", both in {dtypes[0]}" if dtypes else ""


def _tie_words(verdict: dict | None) -> str:
    if verdict is None:
        return ""
    kind = "near-tie" if verdict["near_tie"] else "**CLEAR MARGIN**"
    return f"; {kind}: gap {verdict['gap']:.4g} = {verdict['steps']:.1f} {verdict['dtype']} steps"


# ---- writing ------------------------------------------------------------------------------------
def write_reports(out: Path, records: list[dict], methods, prompts, config: dict, plots: bool = True) -> dict:
    """summary.json, summary.md and the plots from the results; prints the overall table."""
    categories = {p.id: p.category for p in prompts}
    summary = summarize(records, [m.label for m in methods], config["baseline"], categories,
                        greedy=config["temperature"] == 0, near_ties=read_near_ties(out))
    written, note = [], ""
    if plots:
        try:
            from .bench_plots import write_plots
        except ImportError as exc:
            note = f"Plots skipped: {exc}. Install them with `pip install 'specframe[bench]'` (matplotlib)."
            print(f"specframe bench: {note}", file=sys.stderr)
        else:
            written = write_plots(out, summary)
    (out / "summary.json").write_text(json.dumps({"config": config, **summary}, indent=2) + "\n")
    text = markdown(summary, config, written, note)
    (out / "summary.md").write_text(text)
    overall = text[text.index("## Overall"):text.index("## Speedup by category")]
    print(overall.rstrip() + "\n\n" + "\n".join(_losslessness(summary)))
    print(f"\nspecframe bench: wrote {out / 'summary.md'}, summary.json, results.jsonl"
          + (f" and {len(written)} plots" if written else ""), file=sys.stderr)
    return summary


def write_near_ties(out: Path, model, ids: dict[str, list[int]], records: list[dict], baseline: str) -> None:
    """OUT/near_ties.json: the near-tie verdict of every greedy mismatch (read again by --report-only)."""
    (out / NEAR_TIES_FILE).write_text(json.dumps(judge_mismatches(model, ids, records, baseline), indent=1) + "\n")


def read_near_ties(out: Path) -> dict:
    try:
        return json.loads((out / NEAR_TIES_FILE).read_text())
    except (OSError, ValueError):
        return {}
