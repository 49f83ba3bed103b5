"""Prompt sets: the truncated ShareGPT file, its 80/20 split, and Spec-Bench loading."""

from __future__ import annotations

import json

import pytest

from specframe.data import (
    load_spec_bench, parse_truncated_array, sharegpt_exchanges, sharegpt_prompts, split_records,
)
from specframe.errors import ConfigError


def conversation(i: int) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                             {"from": "gpt", "value": f"answer {i}"}]}


@pytest.fixture()
def truncated_file(tmp_path):
    """Ten whole records, then one cut off in the middle, as in the bundled ShareGPT file."""
    whole = json.dumps([conversation(i) for i in range(11)], indent=2)
    cut = whole.index('"c10"') + 12
    path = tmp_path / "sharegpt.json"
    path.write_text(whole[:cut])
    return path


def test_parsing_stops_at_the_first_broken_record(truncated_file):
    records = parse_truncated_array(truncated_file.read_text())
    assert [r["id"] for r in records] == [f"c{i}" for i in range(10)]


def test_a_complete_array_parses_whole():
    assert parse_truncated_array(json.dumps([1, {"a": 2}, [3]])) == [1, {"a": 2}, [3]]
    assert parse_truncated_array("") == []


def test_first_80_percent_train_last_20_percent_heldout(truncated_file):
    train = sharegpt_prompts("train", path=truncated_file)
    heldout = sharegpt_prompts("heldout", path=truncated_file)
    assert [p.text for p in train] == [f"question {i}" for i in range(8)]
    assert [p.text for p in heldout] == ["question 8", "question 9"]
    assert sharegpt_exchanges("heldout", path=truncated_file) == [("question 8", "answer 8"), ("question 9", "answer 9")]
    with pytest.raises(ConfigError, match="unknown split"):
        split_records([], "test")


def test_empty_first_turns_are_skipped(tmp_path):
    records = [conversation(i) for i in range(10)]
    records[1]["conversations"][0]["value"] = "  "
    path = tmp_path / "s.json"
    path.write_text(json.dumps(records))
    assert "question 1" not in [p.text for p in sharegpt_prompts("train", path=path)]


@pytest.fixture()
def spec_bench(tmp_path):
    path = tmp_path / "question.jsonl"
    rows = [{"question_id": i, "category": c, "turns": [f"{c} {i}", "second turn"]}
            for i, c in enumerate(["writing"] * 6 + ["math"] * 3 + ["qa"] * 1)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_spec_bench_loads_first_turns_by_category_with_a_stratified_limit(spec_bench):
    prompts = load_spec_bench(spec_bench)
    assert len(prompts) == 10 and prompts[0].text == "writing 0" and prompts[0].category == "writing"
    assert [p.id for p in load_spec_bench(spec_bench, categories=["math"])] == ["6", "7", "8"]
    subset = load_spec_bench(spec_bench, limit=5)
    counts = {c: sum(p.category == c for p in subset) for c in ("writing", "math", "qa")}
    assert counts == {"writing": 2, "math": 2, "qa": 1}
    with pytest.raises(ConfigError, match="unknown categories"):
        load_spec_bench(spec_bench, categories=["poetry"])


def test_spec_bench_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "turns": ["a"]}\n{"oops": 1}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        load_spec_bench(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec_bench(tmp_path / "missing.jsonl")


def test_the_real_spec_bench_file_in_the_repo():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "spec_bench" / "question.jsonl"
    prompts = load_spec_bench(path, limit=120)
    assert len(prompts) == 120 and len({p.category for p in prompts}) >= 6
