"""`specframe train early-exit` end to end on a tiny random Llama, and the defaults it derives
from the model.

The end-to-end test trains a head through the real CLI entry with tiny data settings, then
generates with it through `specframe run --drafter-opt head=...` and checks that greedy output
equals plain decoding in the same dtype: in fp32, and in bf16 (`SPECFRAME_ASSUME_BF16=1`, the
dtype `--dtype auto` picks on CPUs with bf16 units), where training used to crash.
"""

from __future__ import annotations

import json

import pytest
import torch

from specframe import cli
from specframe.errors import ConfigError
from specframe.training.options import EarlyExitOptions, default_exit_layer, stored_layers

PROMPTS = ["Explain what a hash table is.", "Write a haiku about the sea.", "List three prime numbers."]
TINY_DATA = ["--prompts", "8", "--heldout-prompts", "4", "--gen-batch-size", "4", "--max-new-tokens", "16",
             "--recorded-answers", "4", "--recorded-batch-size", "4", "--workers", "1", "--epochs", "2",
             "--eval-points", "1", "--reduced-vocab", "256"]


def save_tiny_llama(directory, tokenizer_dir) -> str:
    """A random Llama (4 layers, hidden 64) with the default model's tokenizer; peaked distributions."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)  # peaked distributions: few near-ties for greedy to trip on
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from specframe.models import default_model_dir

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), default_model_dir())


def specframe(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_and_compare(tiny_llama_dir, tmp_path, capsys, *extra) -> dict:
    """Train a head with the CLI (`extra` flags added), then check greedy `run` with it against
    plain `run`; the head's metadata."""
    head = tmp_path / "tiny-head.safetensors"
    code, _, err = specframe(capsys, "train", "early-exit", "--model", tiny_llama_dir, "--output", head,
                             "--layer", "2", *TINY_DATA, *extra)
    assert code == 0, err
    accepted = 0
    for prompt in PROMPTS:
        results = {}
        for drafter in (["--drafter", "none"], ["--drafter-opt", f"head={head}", "--controller", "fixed"]):
            code, out, err = specframe(capsys, "run", "--model", tiny_llama_dir, "--max-new-tokens", 24, "--json",
                                       *drafter, prompt)
            assert code == 0, err
            results[drafter[0]] = json.loads(out)
        assert results["--drafter-opt"]["tokens"] == results["--drafter"]["tokens"], prompt
        accepted += results["--drafter-opt"]["stats"]["accepted"]
    assert accepted > 0, "the trained head never had a draft accepted"
    assert not (tmp_path / "tiny-head.checkpoint.pt").exists(), "a finished training keeps no checkpoint"
    metadata = json.loads(head.with_suffix(".json").read_text())
    assert metadata["timing"]["train_dtype"] in ("fp32", "bf16") and "--train-dtype auto" in metadata["training_command"]
    return metadata


@pytest.fixture
def private_cache(tmp_path, monkeypatch, tiny_llama_dir):
    """Distillation data go to a fresh cache (the tiny model's directory is made first)."""
    monkeypatch.setenv("SPECFRAME_CACHE", str(tmp_path / "cache"))


def test_train_a_head_for_a_tiny_llama_and_decode_losslessly_with_it_fp32(tiny_llama_dir, tmp_path, capsys,
                                                                            monkeypatch, private_cache):
    monkeypatch.setenv("SPECFRAME_ASSUME_BF16", "0")
    metadata = train_and_compare(tiny_llama_dir, tmp_path, capsys)
    assert metadata["timing"]["dtype"] == "fp32" and "--dtype fp32" in metadata["training_command"]
    assert "--store-layers 2 " in metadata["training_command"]  # derived: this model has no layer 4, 6, 8 or 12


@pytest.mark.bf16
def test_train_a_head_for_a_tiny_llama_and_decode_losslessly_with_it_bf16(tiny_llama_dir, tmp_path, capsys,
                                                                            monkeypatch, private_cache):
    """auto = bf16: the target and its data in bf16, the head trained in fp32; decoding in bf16."""
    monkeypatch.setenv("SPECFRAME_ASSUME_BF16", "1")
    metadata = train_and_compare(tiny_llama_dir, tmp_path, capsys)
    assert metadata["timing"]["dtype"] == "bf16" and metadata["data"]["settings"]["dtype"] == "bf16"


def test_an_impossible_exit_layer_names_the_model_depth(tiny_llama_dir, tmp_path, capsys, private_cache):
    code, _, err = specframe(capsys, "train", "early-exit", "--model", tiny_llama_dir, "--layer", "4",
                             "--output", tmp_path / "h.safetensors", *TINY_DATA)
    assert code == 2 and "--layer 4 is impossible: this model has 4 layers" in err and "[1, 3]" in err
    assert not (tmp_path / "cache" / "distill").exists()  # failed before building any data


# ---- defaults derived from the model -----------------------------------------------------------
@pytest.mark.parametrize("num_layers, expected", [(2, 1), (4, 1), (12, 2), (30, 6), (32, 6)])
def test_the_default_exit_layer_is_about_a_fifth_of_the_depth(num_layers, expected):
    assert default_exit_layer(num_layers) == expected


def test_stored_layers_are_the_exit_layer_and_the_extras_the_model_has():
    assert stored_layers(6, 30) == (2, 4, 6, 8, 12)  # the default model: as before
    assert stored_layers(1, 4) == (1, 2)
    assert stored_layers(3, 4) == (2, 3)
    assert stored_layers(1, 2) == (1,)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_any_exit_layer_below_the_last_works_without_other_flags(layer):
    resolved = EarlyExitOptions(layer=layer).for_model(4, "fp32")
    assert resolved.layer == layer and layer in resolved.store_layers
    assert all(1 <= n <= 3 for n in resolved.store_layers)


def test_the_default_model_keeps_its_defaults():
    resolved = EarlyExitOptions().for_model(30, "fp32")
    assert resolved.layer == 6 and resolved.store_layers == (2, 4, 6, 8, 12)


def test_impossible_layers_get_clear_errors():
    with pytest.raises(ConfigError, match=r"--layer 0 is impossible: this model has 4 layers.*\[1, 3\]"):
        EarlyExitOptions(layer=0).for_model(4, "fp32")
    with pytest.raises(ConfigError, match=r"--layer 5 is impossible: this model has 4 layers.*\[1, 3\]"):
        EarlyExitOptions(layer=5).for_model(4, "fp32")
    with pytest.raises(ConfigError, match=r"with a 2-layer head the exit layer must be in \[1, 2\]"):
        EarlyExitOptions(layer=3, head_layers=2).for_model(4, "fp32")
    with pytest.raises(ConfigError, match=r"--layer 3 is not among --store-layers \[1, 2\]"):
        EarlyExitOptions(layer=3, store_layers=[1, 2]).for_model(4, "fp32")


def test_train_an_eagle_head_for_a_tiny_llama_and_decode_losslessly_with_it(tiny_llama_dir, tmp_path, capsys,
                                                                              monkeypatch, private_cache):
    """`--head-kind eagle`: the data store the last-layer feature, the file records the kind."""
    from specframe.heads import read_head_file

    monkeypatch.setenv("SPECFRAME_ASSUME_BF16", "0")
    metadata = train_and_compare(tiny_llama_dir, tmp_path, capsys, "--head-kind", "eagle")
    assert metadata["head_kind"] == "eagle" and metadata["data"]["settings"]["final"] is True
    assert "--head-kind eagle" in metadata["training_command"] and "--store-final" in metadata["training_command"]
    assert metadata["acceptance"]["heldout_second_draft_top1"] is not None
    header, _ = read_head_file(tmp_path / "tiny-head.safetensors", tensors=False)
    assert header["kind"] == "eagle"
