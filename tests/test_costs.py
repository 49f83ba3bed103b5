"""`specframe costs`: the cost model (exact) and the measurement of the real drafter's step on a
tiny model with a tiny head."""

import json

import pytest

from specframe import cli
from specframe.cost_model import break_even, expected_tokens, summarize
from specframe.costs import format_table, parse_sizes
from specframe.errors import ConfigError
from specframe.timing import early_exit_drafter, measure

from .test_early_exit import train_tiny_head


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 3) == 4 and expected_tokens(0.0, 5) == 1


def test_break_even_and_best_speedup_follow_from_the_costs():
    ms = {1: 10.0, 2: 15.0, 4: 50.0, "draft": 1.0}  # t=2 costs 1.5 forwards; a draft step 0.1
    rows = {row["draft_length"]: row for row in summarize(ms, [1, 2, 4])["draft_lengths"]}
    assert rows[1]["round_cost"] == pytest.approx(1.6)
    assert rows[1]["best_speedup"] == pytest.approx(2 / 1.6, abs=1e-3)
    assert rows[1]["break_even_acceptance"] == pytest.approx(0.6, abs=1e-3)  # 1 + a = 1.6
    assert rows[3]["round_cost"] == pytest.approx(5.3) and rows[3]["break_even_acceptance"] is None  # > 4 tokens
    assert break_even(1, 1.6) == pytest.approx(0.6, abs=1e-3) and break_even(2, 3.5) is None


def test_sizes_are_checked_with_a_clear_error(capsys):
    assert parse_sizes("4,2") == [1, 2, 4]
    for bad in ("2,x", "0,2", "1,100"):
        with pytest.raises(ConfigError, match="--sizes"):
            parse_sizes(bad)
    assert cli.main(["costs", "--sizes", "two"]) == ConfigError.exit_code
    assert "--sizes must be comma-separated whole numbers" in capsys.readouterr().err


def test_measure_times_every_size_and_the_real_drafter_step(tiny_model, monkeypatch):
    head, _, _ = train_tiny_head(tiny_model, steps_epochs=1)
    drafter = early_exit_drafter(head)
    steps = []
    real_step = type(drafter)._step
    monkeypatch.setattr(type(drafter), "_step", lambda self, token: steps.append(token) or real_step(self, token))
    result = measure(tiny_model, [1, 2, 3], context=20, repeats=3, drafter=drafter)
    assert len(steps) == 1 + 3  # the drafter's own step: one warm-up and one per repeat
    assert head.length == 20  # the draft step's position was rolled back after every timing
    assert set(result["forward_ms"]) == {"1", "2", "3"} and result["relative"]["1"] == 1.0
    assert result["draft_step_ms"] > 0
    assert [row["draft_length"] for row in result["draft_lengths"]] == [1, 2]
    result["settings"] = {"context": 20, "dtype": "float32", "threads": 1, "repeats": 3}
    assert "break-even acceptance" in format_table(result)


def test_costs_command_times_a_named_drafter(tmp_path, capsys):
    from .test_cli import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    assert cli.main(["costs", "--model", str(model_dir), "--context", "16", "--repeats", "3", "--sizes", "2",
                     "--drafter", "self_exit:layer=1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["drafter"] == "self_exit:layer=1" and result["draft_step_ms"] > 0
    assert cli.main(["costs", "--drafter", "self_exit:layer=x"]) == ConfigError.exit_code  # before loading


def test_training_records_the_draft_cost_through_the_same_measurement(tiny_model):
    from specframe.training.head import measure_draft_cost

    head, _, _ = train_tiny_head(tiny_model, steps_epochs=1)
    cost = measure_draft_cost(tiny_model, head, context_tokens=20, repeats=3)
    assert cost["full_forward_ms"] > 0 and cost["draft_step_ms"] > 0 and cost["context_tokens"] == 20
    ratio, forward = cost["draft_step_over_forward"], cost["full_forward_ms"]
    rounding = 0.005 * (1 + ratio) / forward  # the ratio's error from the times' rounding to 0.01 ms
    assert ratio == pytest.approx(cost["draft_step_ms"] / forward, rel=0.02, abs=rounding)
