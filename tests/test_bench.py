"""`specframe bench` on a tiny random Llama: method specs, prompt selection, statistics, resume,
interrupts and the losslessness check."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from attrs import define

from specframe import bench, plugins
from specframe.bench import MethodSpec, load_prompts, parse_method, parse_methods, split_methods
from specframe.bench_report import first_difference, mean_ci, summarize, t_critical
from specframe.errors import ConfigError, UnknownComponentError
from specframe.hookspecs import hookimpl
from specframe.types import Verdict

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]  # 64 tokens, eos = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved like any HF model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 rows: 3 categories of sizes 6, 4 and 2; one multi-turn row."""
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    rows = []
    for category, count in (("alpha", 6), ("beta", 4), ("gamma", 2)):
        for i in range(count):
            turns = [" ".join(f"w{(7 * i + j + len(rows)) % 61}" for j in range(5 + i))]
            rows.append({"question_id": len(rows) + 1, "category": category, "turns": turns})
    rows[0]["turns"].append("w1 w2 second turn is ignored")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def run_bench(model_dir, dataset, out, *extra) -> int:
    args = bench_args("--model", model_dir, "--device", "cpu", "--dataset", dataset, "--max-new-tokens", 8,
                      "--out", out, "--no-progress", *extra)
    return bench.run(args)


def read_results(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# ---- method specs -----------------------------------------------------------------------------
def test_split_methods_keeps_options_with_their_method():
    assert split_methods("hf, early_exit+fixed:k=3,max_k=8 ,ngram+heuristic") == [
        "hf", "early_exit+fixed:k=3,max_k=8", "ngram+heuristic"]


def test_parse_hugging_face_methods():
    assert parse_method("hf") == MethodSpec("hf", "hf")
    assert parse_method("hf-early-exit") == MethodSpec("hf-early-exit:4", "hf-early-exit", hf_param=4)
    assert parse_method("hf-prompt-lookup:7").hf_param == 7
    assert parse_method("hf-assisted").kind == "hf-assisted"
    assert parse_method("none") == MethodSpec("none", "engine")  # plain decoding has one name
    assert parse_method("specframe") == parse_method("none")  # the old spelling is still read


def test_parse_specframe_methods_canonical_labels(registry):
    method = parse_method("ngram:min_ngram=2,max_ngram=4+fixed:k=3", registry)
    assert (method.drafter, method.controller, method.verifier) == ("ngram", "fixed", "auto")
    assert method.label == "ngram:max_ngram=4,min_ngram=2+fixed:k=3"
    assert method.options_of("drafter") == {"max_ngram": "4", "min_ngram": "2"}
    assert parse_method("ngram+heuristic+auto", registry).label == "ngram+heuristic"
    assert parse_method("self_exit:layer=2+confidence+greedy", registry).verifier == "greedy"


@pytest.mark.parametrize("spec, message", [
    ("", "empty entry"),
    ("hf-early-exit:x", "whole number"),
    ("hf-prompt-lookup:0", "whole number"),
    ("hf:3", "takes no parameter"),
    ("hf-turbo", "unknown Hugging Face method"),
    ("ngram", "names one part"),
    ("ngram+fixed+greedy+auto", "at most"),
    ("ngram+fixed:k", "key=value"),
    ("ngram+fixed:", "no key=value"),
    ("ngram+fixed:kk=3", "no option 'kk'"),
    ("ngram+fixed:k=three", "must be int"),
    ("ngr@m+fixed", "not a name"),
])
def test_bad_method_specs_say_what_is_wrong(registry, spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_method(spec, registry)


def test_unknown_part_lists_what_exists(registry):
    with pytest.raises(UnknownComponentError, match="available drafters: .*ngram"):
        parse_method("nope+fixed", registry)
    with pytest.raises(UnknownComponentError, match="available controllers: .*heuristic"):
        parse_method("ngram+nope", registry)


def test_duplicate_methods_are_an_error(registry):
    with pytest.raises(ConfigError, match="listed twice"):
        parse_methods("hf,ngram+fixed,ngram+fixed+auto", registry)


# ---- prompts ----------------------------------------------------------------------------------
def test_stratified_limit_gives_every_category_a_turn(dataset):
    prompts = load_prompts(str(dataset))
    assert len(prompts) == 12 and prompts[0].text.startswith("w") and "second turn" not in prompts[0].text

    def counts(chosen):
        return {c: sum(p.category == c for p in chosen) for c in ("alpha", "beta", "gamma")}

    assert counts(load_prompts(str(dataset), None, 7)) == {"alpha": 3, "beta": 2, "gamma": 2}
    # gamma runs out at 2; the others share the remainder
    assert counts(load_prompts(str(dataset), None, 11)) == {"alpha": 5, "beta": 4, "gamma": 2}
    assert [p.id for p in load_prompts(str(dataset), ["alpha"], 3)] == ["1", "3", "5"]  # spread out, file order
    with pytest.raises(ConfigError, match="unknown categories"):
        load_prompts(str(dataset), ["delta"])
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        load_prompts(str(dataset), None, 0)


def test_bad_datasets_say_what_is_wrong(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "category": "a", "turns": ["x"]}\n{"category": "a"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        load_prompts(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="one category"):
        load_prompts("sharegpt", ["writing"])


# ---- statistics -------------------------------------------------------------------------------
def test_confidence_interval():
    result = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert result["mean"] == 3.0 and result["n"] == 5
    assert result["ci"] == pytest.approx(2.776 * 1.5811388 / 5 ** 0.5, rel=1e-4)
    assert mean_ci([2.0]) == {"mean": 2.0, "ci": None, "n": 1}
    assert mean_ci([])["mean"] is None
    assert t_critical(1) == 12.706 and t_critical(30) == 2.042
    assert 2.000 < t_critical(50) < 2.021 and 1.96 < t_critical(10_000) < 1.961


def _record(prompt, method, tokens, tps, repeat=0):
    return {"prompt_id": prompt, "method": method, "repeat": repeat, "tokens": tokens, "new_tokens": len(tokens),
            "seconds": len(tokens) / tps, "tokens_per_second": tps, "stats": None}


def test_first_difference_finds_the_first_differing_position_or_the_shorter_length():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([], [7]) == 0


def test_summary_speedup_is_mean_of_per_prompt_ratios_and_counts_mismatches():
    records = [_record("1", "hf", [1, 2, 3], 10.0), _record("1", "x", [1, 2, 3], 20.0),
               _record("2", "hf", [4, 5], 10.0), _record("2", "x", [4, 6], 10.0),
               {"prompt_id": "2", "method": "x", "repeat": 0, "error": "RuntimeError: boom"}]
    summary = summarize(records, ["hf", "x"], "hf", {"1": "a", "2": "b"}, greedy=True)
    x = summary["methods"]["x"]
    assert x["speedup"]["mean"] == pytest.approx(1.5) and x["speedup"]["n"] == 2
    assert (x["mismatches"], x["compared"], x["errors"]) == (1, 2, 1)
    assert x["mismatch_examples"][0] == {"prompt_id": "2", "repeat": 0, "first_difference": 1, "lengths": [2, 2]}
    assert x["by_category"]["a"]["speedup"]["mean"] == pytest.approx(2.0)
    assert summary["methods"]["hf"]["mismatches"] is None  # the baseline is not compared with itself
    sampled = summarize(records, ["hf", "x"], "hf", {"1": "a", "2": "b"}, greedy=False)
    assert sampled["methods"]["x"]["mismatches"] is None


# ---- end to end -------------------------------------------------------------------------------
METHODS = "hf,hf-early-exit:2,hf-prompt-lookup:3,none,ngram+heuristic,self_exit:layer=2+fixed:k=2"


def test_bench_end_to_end_is_lossless_and_writes_reports(model_dir, dataset, tmp_path):
    out = tmp_path / "out"
    assert run_bench(model_dir, dataset, out, "--limit", 4, "--methods", METHODS) == 0
    records = read_results(out)
    assert len(records) == 4 * 6 and not any(r.get("error") for r in records)
    assert [r["category"] for r in records[::6]] == ["alpha", "beta", "gamma", "alpha"]  # categories take turns
    orders = [tuple(r["method"] for r in records[i:i + 6]) for i in range(0, 24, 6)]
    assert len(set(orders)) == 4  # the method order rotates from prompt to prompt
    summary = json.loads((out / "summary.json").read_text())
    for label, method in summary["methods"].items():
        assert method["mismatches"] in (None, 0), (label, method["mismatch_examples"])
    assert summary["methods"]["hf"]["mean_accepted_length"] == 1.0  # one token per forward pass
    assert summary["methods"]["none"]["mean_accepted_length"] == 1.0  # the prefill pass counts too
    assert summary["methods"]["hf-early-exit:2"]["mean_accepted_length"] >= 1.0  # drafting passes not counted
    spec = summary["methods"]["ngram+heuristic"]
    assert spec["mean_accepted_length"] >= 1.0 and spec["position_accepts"]
    assert summary["methods"]["self_exit:layer=2+fixed:k=2"]["draft_length_histogram"]["2"] > 0
    text = (out / "summary.md").read_text()
    assert "## Speedup by category" in text and "greedy mismatches" in text and "All identical" in text
    if bench_plots_available():
        assert (out / "speedup_by_category.png").stat().st_size > 0
        assert (out / "acceptance_by_position.png").exists() and (out / "draft_lengths.png").exists()


def bench_plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_results_exist_needs_resume_or_overwrite(model_dir, dataset, tmp_path):
    out = tmp_path / "out"
    assert run_bench(model_dir, dataset, out, "--limit", 1, "--methods", "hf,none", "--no-plots") == 0
    with pytest.raises(ConfigError, match="--resume"):
        run_bench(model_dir, dataset, out, "--limit", 1, "--methods", "hf,none")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        bench.run(bench_args("--model", model_dir, "--device", "cpu", "--dataset", dataset, "--max-new-tokens", 9,
                             "--out", out, "--no-progress", "--limit", 1, "--methods", "hf", "--resume"))
    assert run_bench(model_dir, dataset, out, "--limit", 1, "--methods", "hf", "--overwrite", "--no-plots") == 0
    assert len(read_results(out)) == 1
    # a resumed run may take more prompts: records are per prompt, so the finished one is kept
    assert run_bench(model_dir, dataset, out, "--limit", 3, "--methods", "hf", "--resume", "--no-plots") == 0
    assert len(read_results(out)) == 3


def test_report_only_summarises_without_loading_a_model(model_dir, dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="holds no results"):
        run_bench(model_dir, dataset, out, "--limit", 2, "--methods", "hf,none", "--report-only")
    assert run_bench(model_dir, dataset, out, "--limit", 2, "--methods", "hf,none", "--no-plots") == 0
    (out / "summary.md").unlink()
    monkeypatch.setattr(bench, "_load_models", lambda args: pytest.fail("--report-only loaded a model"))
    assert run_bench(model_dir, dataset, out, "--limit", 2, "--methods", "hf,none", "--report-only",
                     "--no-plots") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["none"]["generations"] == 2
    assert "none" in (out / "summary.md").read_text()


def test_interrupt_keeps_finished_records_and_resume_completes(model_dir, dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_run_one, calls = bench.Bench.run_one, []

    def interrupted_run_one(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_run_one(self, *args, **kwargs)

    monkeypatch.setattr(bench.Bench, "run_one", interrupted_run_one)
    assert run_bench(model_dir, dataset, out, "--limit", 3, "--methods", "hf,ngram+fixed", "--no-plots") == 130
    assert len(read_results(out)) == 3
    assert "## Overall" in (out / "summary.md").read_text()
    monkeypatch.setattr(bench.Bench, "run_one", real_run_one)
    # a torn last line (killed mid-write) is skipped, and resume may add a method
    with (out / "results.jsonl").open("a") as handle:
        handle.write('{"prompt_id": "1", "meth')
    assert run_bench(model_dir, dataset, out, "--limit", 3, "--methods", "hf,ngram+fixed,specframe",
                     "--resume", "--no-plots") == 0
    records = [r for r in bench.ResultsFile(out / "results.jsonl").read()]
    keys = [bench.record_key(r) for r in records]
    assert len(keys) == len(set(keys)) == 3 * 3


@define
class AcceptEverythingVerifier:
    """Lossy on purpose: keeps every draft whatever the target says (and says so)."""

    lossless = False

    def verify(self, draft_tokens, q, p, sampler):
        return Verdict(len(draft_tokens), int(p[-1].argmax()))


class LossyPlugin:
    @staticmethod
    @hookimpl
    def register_verifiers(register):
        register("accept_all", AcceptEverythingVerifier, "lossy on purpose")


def test_losslessness_check_counts_a_lossy_method(model_dir, dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plugins, "_default_registry", plugins.PluginRegistry(autoload=False,
                                                                             extra_plugins=[LossyPlugin]))
    out = tmp_path / "out"
    code = run_bench(model_dir, dataset, out, "--limit", 6, "--max-new-tokens", 24, "--no-plots",
                     "--methods", "hf,self_exit:layer=1+fixed:k=4+accept_all", "--fail-on-mismatch")
    assert "lossy verifier" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    lossy = summary["methods"]["self_exit:layer=1+fixed:k=4+accept_all"]
    assert lossy["compared"] == 6 and lossy["mismatches"] > 0
    assert code == 3
    assert "generations differ" in (out / "summary.md").read_text()


def test_losslessness_check_counts_a_broken_engine(model_dir, dataset, tmp_path, monkeypatch):
    """A bug the engine's own checks would not see (here: one token changed after the fact)."""
    real_generate = bench.SpecframeRunner.generate

    def broken_generate(self, ids, *args, **kwargs):
        outcome = real_generate(self, ids, *args, **kwargs)
        if self.method.label == "ngram+fixed" and len(ids) % 2:  # prompts of odd length only
            outcome = bench.Outcome([*outcome.tokens[:-1], (outcome.tokens[-1] + 1) % len(WORDS)],
                                    outcome.seconds, outcome.finish_reason, outcome.stats)
        return outcome

    monkeypatch.setattr(bench.SpecframeRunner, "generate", broken_generate)
    out = tmp_path / "out"
    assert run_bench(model_dir, dataset, out, "--limit", 6, "--no-plots", "--methods", "hf,none,ngram+fixed") == 0
    summary = json.loads((out / "summary.json").read_text())
    odd = sum(r["prompt_tokens"] % 2 for r in read_results(out) if r["method"] == "hf")
    assert 0 < odd < 6
    assert summary["methods"]["ngram+fixed"]["mismatches"] == odd
    assert summary["methods"]["none"]["mismatches"] == 0
    examples = summary["methods"]["ngram+fixed"]["mismatch_examples"]
    assert all(e["first_difference"] == 7 for e in examples)  # the last of 8 new tokens


def test_sampled_run_and_hf_assisted(model_dir, dataset, tmp_path):
    out = tmp_path / "out"
    assert run_bench(model_dir, dataset, out, "--limit", 2, "--temperature", 1.0, "--top-k", 20, "--no-plots",
                     "--methods", "hf,hf-assisted,draft_model+fixed:k=2", "--assistant-model", model_dir,
                     "--repeats", 2) == 0
    records = read_results(out)
    assert len(records) == 2 * 3 * 2 and all(r["new_tokens"] > 0 for r in records)
    assert "not compared" in (out / "summary.md").read_text()


def test_hf_assisted_without_assistant_is_an_error(model_dir, dataset, tmp_path):
    with pytest.raises(ConfigError, match="--assistant-model"):
        run_bench(model_dir, dataset, tmp_path / "out", "--methods", "hf,hf-assisted")


def test_without_matplotlib_plots_are_skipped_with_a_message(model_dir, dataset, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.delitem(sys.modules, "specframe.bench_plots", raising=False)
    out = tmp_path / "out"
    assert run_bench(model_dir, dataset, out, "--limit", 1, "--methods", "hf,ngram+fixed") == 0
    assert "specframe[bench]" in capsys.readouterr().err
    assert "Plots skipped" in (out / "summary.md").read_text() and not list(out.glob("*.png"))


def test_cli_subcommand(model_dir, dataset, tmp_path, capsys):
    from specframe.cli import main

    out = tmp_path / "out"
    code = main(["bench", "--model", str(model_dir), "--device", "cpu", "--dataset", str(dataset), "--limit", "1",
                 "--max-new-tokens", "4", "--methods", "none", "--out", str(out), "--no-progress", "--no-plots"])
    assert code == 0 and "## Overall" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["methods"] == ["hf", "none"]  # baseline added
    assert main(["bench", "--dataset", str(dataset), "--methods", "ngram", "--out", str(out)]) == 2
    assert "names one part" in capsys.readouterr().err


def test_bench_compares_chains_and_trees(model_dir, dataset, tmp_path):
    """early_exit as a chain, as a fixed tree and with trees sized by thompson_cost, on one untrained
    head: lossless, and the summary says what the trees drafted (nodes against depth)."""
    from transformers import LlamaForCausalLM

    from specframe.heads import EarlyExitHead

    head = EarlyExitHead(LlamaForCausalLM.from_pretrained(model_dir), exit_layer=2)
    path = head.save_pretrained(tmp_path / "head.safetensors")
    chain, tree = f"early_exit:head={path}+fixed:k=3", f"early_exit:head={path},width=2+fixed:k=6"
    sized = f"early_exit:head={path}+thompson_cost:max_width=3,min_k=1"
    out = tmp_path / "out"
    assert run_bench(model_dir, dataset, out, "--limit", 3, "--baseline", "none",
                     "--methods", ",".join(["none", chain, tree, sized])) == 0
    summary = json.loads((out / "summary.json").read_text())
    methods = {label.split("+")[-1].split(":")[0] + ("-tree" if "width=2" in label else ""): m
               for label, m in summary["methods"].items()}
    assert all(m["mismatches"] in (None, 0) for m in methods.values())
    assert methods["fixed"]["tree_shape"] is None
    shape = methods["fixed-tree"]["tree_shape"]
    assert shape["tree_rounds"] == 1.0 and shape["nodes"] > shape["depth"]
    assert methods["thompson_cost"]["tree_shape"]["tree_rounds"] > 0
    assert "## Token trees" in (out / "summary.md").read_text()
