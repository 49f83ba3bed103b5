"""`specframe run` end to end: a tiny saved model (fast), the real default model (slow), stdin,
--help texts, exit codes, Ctrl-C, and --on-error.

`save_tiny_model` (also used by test_errors.py and test_fuzz.py) writes a random Llama with the
default model's tokenizer (vocabulary 49,152) and hidden size 16, so loading and running it is fast.
"""

from __future__ import annotations

import io
import json
import types

import pytest
import torch

from specframe import cli, hookimpl, plugins
from specframe.drafters.ngram import NgramDrafter
from specframe.plugins import PluginRegistry

TINY_CONTEXT = 256


def save_tiny_model(directory, chat_template: bool = True, seed: int = 0, vocab_size: int = 49152):
    """A random Llama (2 layers, hidden 16, context 256) and the default model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from specframe.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=TINY_CONTEXT, tie_word_embeddings=True,
        initializer_range=0.3, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)  # peaked distributions: no near-ties for greedy to trip on
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny_model")))


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `specframe ARGV...`."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- a tiny model -----------------------------------------------------------------------------
def test_run_json_on_a_tiny_model_equals_plain_decoding(capsys, tiny_dir):
    code, out, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "ngram", "--controller", "fixed",
                         "--max-new-tokens", "12", "--json", "Hello there")
    assert code == 0, err
    spec = json.loads(out)
    code, out, _ = run(capsys, "run", "--model", tiny_dir, "--drafter", "none", "--max-new-tokens", "12",
                       "--json", "Hello there")
    plain = json.loads(out)
    assert code == 0 and spec["tokens"] == plain["tokens"] and len(plain["tokens"]) <= 12
    assert spec["finish_reason"] in ("eos", "length") and spec["stats"]["new_tokens"] == len(spec["tokens"])


def test_prompt_from_stdin(capsys, monkeypatch, tiny_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there"))
    code, out, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "none", "--max-new-tokens", "5", "--json")
    assert code == 0, err
    from_stdin = json.loads(out)["tokens"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there"))
    code, out, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "none", "--max-new-tokens", "5", "--json", "-")
    assert code == 0 and json.loads(out)["tokens"] == from_stdin


def test_no_prompt_at_all_is_a_clear_error(capsys, monkeypatch, tiny_dir):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    code, _, err = run(capsys, "run", "--model", tiny_dir)
    assert code == 2 and "specframe: error: no prompt given" in err


def test_text_output_and_statistics(capsys, tiny_dir):
    code, out, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "ngram", "--controller", "fixed",
                         "--max-new-tokens", "6", "Hi")
    assert code == 0
    assert "tokens/s" in err and "acceptance" in err and "finish:" in err
    code, out, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "ngram", "--quiet", "--max-new-tokens", "3", "Hi")
    assert code == 0 and err == ""


@pytest.mark.parametrize("argv,message", [
    (["--drafter", "nope"], "unknown drafter 'nope'; available drafters: draft_model, early_exit, "),
    (["--controller", "nope"], "unknown controller 'nope'; available controllers:"),
    (["--verifier", "nope"], "unknown verifier 'nope'; available verifiers: auto, greedy, "),
    (["--drafter", "ngram", "--drafter-opt", "size=3"], "drafter 'ngram' has no option 'size'; its options are: max_ngram, min_ngram"),
    (["--drafter", "ngram", "--drafter-opt", "max_ngram"], "--drafter-opt expects KEY=VALUE, got 'max_ngram'"),
    (["--controller", "fixed", "--controller-opt", "k=many"], "option 'k' of controller 'fixed' must be int, got 'many'"),
    (["--controller", "fixed", "--controller-opt", "k=0"], "bad options for controller 'fixed'"),
    (["--controller", "confidence", "--controller-opt", "threshold=nan"], "must be a finite float, got 'nan'"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer, got 0"),
    (["--max-new-tokens", "-5"], "max_new_tokens must be a positive integer, got -5"),
    (["--max-new-tokens", "10000000"], "absurdly large"),
    (["--max-new-tokens", "300"], "leaves no room for the prompt in the model's context of 256 tokens"),
    (["--max-new-tokens", "250"], "exceeds the model's context of 256 tokens"),
    (["--temperature", "-0.5"], "temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0"),
    (["--temperature", "1e-9"], "too close to 0"),
    (["--top-p", "0"], "top_p must be a number in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be a number in (0, 1]"),
    (["--top-p", "nan"], "top_p must be a number in (0, 1]"),
    (["--top-k", "-1"], "top_k must be an integer >= 0"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
    (["--device", "gpu9"], "unknown device 'gpu9'"),
    (["--drafter", "self_exit", "--drafter-opt", "layer=9"], "exit layer must be in [1, 1], got 9"),
    (["--drafter", "early_exit"], "no early-exit head ships for this model"),
    (["--drafter", "draft_model"], "draft_model needs a model"),
    (["--drafter", "early_exit", "--drafter-opt", "head=/no/such/head.safetensors"], "no draft head at"),
])
def test_bad_values_exit_2_with_a_message(capsys, tiny_dir, argv, message):
    code, out, err = run(capsys, "run", "--model", tiny_dir, *argv, "Hello there")
    assert code == 2, err
    assert err.startswith("specframe: error: ") and message in err, err
    assert "Traceback" not in err


def test_long_prompt_needs_truncate_prompt(capsys, tiny_dir):
    prompt = "word " * 400  # ~400 tokens, more than the context of 256
    code, _, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "none", "--max-new-tokens", "4", prompt)
    assert code == 2 and "--truncate-prompt" in err
    code, out, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "none", "--max-new-tokens", "4",
                         "--truncate-prompt", "--json", prompt)
    assert code == 0, err
    assert "specframe: warning: the prompt" in err and f"last {TINY_CONTEXT - 4} tokens" in err
    assert json.loads(out)["stats"]["new_tokens"] == 4


def test_chat_without_a_template(capsys, tmp_path):
    directory = str(save_tiny_model(tmp_path / "no_template", chat_template=False))
    code, _, err = run(capsys, "run", "--model", directory, "--chat", "Hi")
    assert code == 2 and "has no chat template" in err and "--no-chat" in err
    code, _, err = run(capsys, "run", "--model", directory, "--drafter", "none", "--max-new-tokens", "2", "Hi")
    assert code == 0, err  # without --chat, a tokenizer with no template uses the raw text


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "is not a directory"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is not a directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
])
def test_bad_model_paths(capsys, tmp_path, make, message):
    code, _, err = run(capsys, "run", "--model", str(make(tmp_path)), "Hi")
    assert code == 2 and err.startswith("specframe: error: ") and message in err, err


def test_usage_errors_and_help(capsys):
    code, out, _ = run(capsys, "run", "--help")
    assert code == 0
    for flag in ("--drafter", "--controller", "--verifier", "--on-error", "--truncate-prompt", "--json",
                 "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--chat", "examples:"):
        assert flag in out
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "run" in out and "plugins" in out and "bench" in out and "train" in out
    code, _, err = run(capsys, "run", "--max-new-tokens", "many", "Hi")
    assert code == 2 and "invalid int value: 'many'" in err
    code, _, err = run(capsys, "run", "--on-error", "ignore", "Hi")
    assert code == 2 and "invalid choice: 'ignore'" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, out, _ = run(capsys)
    assert code == 2 and "usage:" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "specframe" in out


# ---- Ctrl-C and faulty plugins through the CLI -------------------------------------------------
class InterruptingDrafter(NgramDrafter):
    """Raises KeyboardInterrupt (as Ctrl-C does) in its fourth round."""

    rounds = 0

    def propose(self, context, max_tokens, controller, sampler):
        type(self).rounds += 1
        if type(self).rounds == 4:
            raise KeyboardInterrupt
        return super().propose(context, max_tokens, controller, sampler)


class ExplodingDrafter(NgramDrafter):
    """Raises in its third round."""

    rounds = 0

    def propose(self, context, max_tokens, controller, sampler):
        type(self).rounds += 1
        if type(self).rounds == 3:
            raise RuntimeError("boom")
        return super().propose(context, max_tokens, controller, sampler)


@pytest.fixture
def test_parts(monkeypatch):
    module = types.ModuleType("cli_test_parts")
    module.register_drafters = hookimpl(lambda register: (register("interrupting", InterruptingDrafter),
                                                         register("exploding", ExplodingDrafter)))
    monkeypatch.setattr(plugins, "_default_registry", PluginRegistry(autoload=False, extra_plugins=[module]))
    InterruptingDrafter.rounds = ExplodingDrafter.rounds = 0


def test_ctrl_c_prints_what_was_generated_and_the_statistics(capsys, tiny_dir, test_parts):
    code, out, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "interrupting", "--controller", "fixed",
                         "--max-new-tokens", "40", "--no-chat", "Hello there")
    assert code == 130
    assert out.strip(), "the text generated before Ctrl-C is printed"
    assert "finish: interrupted" in err and "over 3 rounds" in err and "specframe: interrupted after" in err
    InterruptingDrafter.rounds = 0
    code, out, err = run(capsys, "run", "--model", tiny_dir, "--drafter", "interrupting", "--controller", "fixed",
                         "--max-new-tokens", "40", "--no-chat", "--json", "Hello there")
    result = json.loads(out)
    assert code == 130 and result["finish_reason"] == "interrupted" and result["stats"]["rounds"] == 3
    assert result["stats"]["new_tokens"] == len(result["tokens"]) > 3
    code, out, _ = run(capsys, "run", "--model", tiny_dir, "--drafter", "none", "--max-new-tokens", "40",
                       "--no-chat", "--json", "Hello there")
    plain = json.loads(out)["tokens"]
    assert result["tokens"] == plain[: len(result["tokens"])]


def test_on_error_fail_and_fallback(capsys, tiny_dir, test_parts):
    argv = ["run", "--model", tiny_dir, "--drafter", "exploding", "--controller", "fixed", "--max-new-tokens", "30",
            "--no-chat", "--json"]
    code, out, err = run(capsys, *argv, "Hello there")
    assert code == 2 and "specframe: error: drafter 'exploding' of plugin 'cli_test_parts' broke the rule " \
                         "'propose() must not raise': RuntimeError: boom" in err
    ExplodingDrafter.rounds = 0
    code, out, err = run(capsys, *argv, "--on-error", "fallback", "Hello there")
    assert code == 0 and "specframe: warning: drafter 'exploding'" in err and "plain decoding" in err
    result = json.loads(out)
    assert "propose() must not raise" in result["stats"]["fallback"]
    code, out, _ = run(capsys, "run", "--model", tiny_dir, "--drafter", "none", "--max-new-tokens", "30",
                       "--no-chat", "--json", "Hello there")
    assert result["tokens"] == json.loads(out)["tokens"]


# ---- the real default model -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["ngram", "none"])
def test_run_on_the_default_model(capsys, drafter):
    code, out, err = run(capsys, "run", "--drafter", drafter, "--controller", "heuristic", "--max-new-tokens", "24",
                         "--json", "Explain what a hash table is.")
    assert code == 0, err
    result = json.loads(out)
    assert result["drafter"] == drafter and len(result["tokens"]) <= 24 and result["text"].strip()
    assert set(result["stats"]) >= {"rounds", "acceptance_rate", "tokens_per_second", "mean_accepted_length"}


@pytest.mark.slow
def test_default_model_ngram_equals_plain_and_streams_text(capsys):
    prompt = "Repeat exactly: the cat sat on the mat, the cat sat on the mat."
    outputs = {}
    for drafter in ("ngram", "none"):
        code, out, err = run(capsys, "run", "--drafter", drafter, "--controller", "fixed", "--max-new-tokens", "32",
                             prompt)
        assert code == 0 and "tokens/s" in err
        outputs[drafter] = out
    assert outputs["ngram"] == outputs["none"] and outputs["none"].strip()
