"""Every bad input to the Python API is a SpecframeError subclass whose message names the value.

The CLI's counterparts (exit code 2, `specframe: error: ...`) are in test_cli.py.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from specframe import (
    ConfigError,
    ModelLoadError,
    ModelMismatchError,
    PluginLoadError,
    SpecframeError,
    SpeculativeDecoder,
    UnknownComponentError,
)

from specframe.types import SamplingConfig

from .conftest import tiny_llama
from .test_cli import save_tiny_model

PROMPT = [5, 9, 2, 33]


@pytest.fixture(scope="module")
def decoder(tiny_model, stub_tokenizer, registry):
    return SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="ngram", controller="fixed", registry=registry)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


# ---- errors themselves ------------------------------------------------------------------------
def test_every_error_is_a_specframe_error_with_exit_code_2():
    from specframe.errors import PluginContractError
    from specframe.heads import HeadFileError

    for error in (UnknownComponentError, PluginLoadError, PluginContractError, ModelMismatchError, ConfigError,
                  ModelLoadError, HeadFileError):
        assert issubclass(error, SpecframeError) and error.exit_code == 2
    error = PluginContractError("my-plugin", "q rows sum to 1", "row sums [2.0]", part="drafter 'mine'")
    assert str(error) == "drafter 'mine' of plugin 'my-plugin' broke the rule 'q rows sum to 1': row sums [2.0]"
    assert str(PluginContractError("mine", "a rule")) == "plugin 'mine' broke the rule 'a rule'"
    import pickle

    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.part == "drafter 'mine'"
    unknown = UnknownComponentError("drafter", "nope", ["b", "a"])
    assert str(unknown).startswith("unknown drafter 'nope'; available drafters: a, b.")
    assert isinstance(unknown, KeyError) and isinstance(ConfigError("x"), ValueError)


# ---- names and options ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(drafter="nope"), UnknownComponentError, "unknown drafter 'nope'; available drafters: .*ngram.*self_exit"),
    (dict(controller="nope"), UnknownComponentError, "unknown controller 'nope'; available controllers: .*fixed"),
    (dict(verifier="nope"), UnknownComponentError, "unknown verifier 'nope'; available verifiers: auto, greedy"),
    (dict(drafter=""), UnknownComponentError, "unknown drafter ''"),
    (dict(drafter=5), ConfigError, "drafter must be a name .*got 5"),
    (dict(controller=None), ConfigError, "controller must be a name .*got None"),
    (dict(verifier=["greedy"]), ConfigError, r"verifier must be a name .*got \['greedy'\]"),
    (dict(drafter_options={"size": "3"}), ConfigError, "drafter 'ngram' has no option 'size'; its options are: max_ngram, min_ngram"),
    (dict(drafter_options={"max_ngram": "three"}), ConfigError, "option 'max_ngram' of drafter 'ngram' must be int, got 'three'"),
    (dict(drafter_options={"max_ngram": 2.5}), ConfigError, "bad options for drafter 'ngram' .*max_ngram=2.5"),
    (dict(drafter_options={"max_ngram": "0"}), ConfigError, "bad options for drafter 'ngram'"),
    (dict(drafter_options="max_ngram=2"), ConfigError, "drafter_options must be a dict"),
    (dict(controller_options={"k": "many"}), ConfigError, "option 'k' of controller 'fixed' must be int, got 'many'"),
    (dict(controller_options={"k": "0"}), ConfigError, "bad options for controller 'fixed'"),
    (dict(controller_options={"k": "100000"}), ConfigError, "bad options for controller 'fixed'"),
    (dict(controller_options={"k": None}), ConfigError, "bad options for controller 'fixed'"),
    (dict(controller="confidence", controller_options={"threshold": "inf"}), ConfigError, "must be a finite float"),
    (dict(controller="confidence", controller_options={"threshold": "1.5"}), ConfigError, "bad options for controller"),
    (dict(controller="thompson", controller_options={"persist": "maybe"}), ConfigError, "must be bool, got 'maybe'"),
    (dict(verifier_options={"strict": "1"}), ConfigError, "verifier 'auto' has no option 'strict'"),
    (dict(controller_options=[("k", 3)]), ConfigError, "controller_options must be a dict"),
    (dict(on_error="ignore"), ConfigError, "on_error must be one of fail, fallback, got 'ignore'"),
    (dict(on_error=None), ConfigError, "on_error must be one of fail, fallback"),
])
def test_bad_names_and_options(tiny_model, stub_tokenizer, registry, kwargs, error, match):
    kwargs = {"drafter": "ngram", "controller": "fixed", **kwargs}
    with pytest.raises(error, match=match):
        SpeculativeDecoder(tiny_model, stub_tokenizer, registry=registry, **kwargs)


def test_bad_model_tokenizer_and_registry(tiny_model, stub_tokenizer, registry):
    from transformers import BertConfig, BertLMHeadModel, T5Config, T5ForConditionalGeneration

    with pytest.raises(ConfigError, match="model must be a Hugging Face causal LM .*got str.*from_pretrained"):
        SpeculativeDecoder("HuggingFaceTB/SmolLM2-135M", stub_tokenizer, registry=registry)
    with pytest.raises(ConfigError, match="got NoneType"):
        SpeculativeDecoder(None, stub_tokenizer, registry=registry)
    bert = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(ConfigError, match="encoder-only model \\(bert"):
        SpeculativeDecoder(bert, stub_tokenizer, drafter="none", registry=registry)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ConfigError, match="encoder-decoder model \\(t5\\)"):
        SpeculativeDecoder(t5, stub_tokenizer, drafter="none", registry=registry)
    with pytest.raises(ConfigError, match="tokenizer must be a Hugging Face tokenizer"):
        SpeculativeDecoder(tiny_model, 42, drafter="none", registry=registry)
    with pytest.raises(ConfigError, match="registry must be"):
        SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="none", registry="builtin")


def test_a_plugin_whose_factory_raises_anything_is_a_config_error(registry):
    import types

    from specframe import hookimpl
    from specframe.plugins import PluginRegistry

    def factory(**options):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    module = types.ModuleType("odd_plugin")
    module.register_drafters = hookimpl(lambda register: register("odd", factory))
    odd = PluginRegistry(autoload=False, extra_plugins=[module])
    with pytest.raises(ConfigError, match="bad options for drafter 'odd' \\(plugin 'odd_plugin'\\).*AttributeError"):
        odd.create("drafter", "odd", {})


# ---- generation arguments ---------------------------------------------------------------------
BAD_GENERATION = [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer, got -3"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be a positive integer, got 2.0"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(max_new_tokens="8"), "max_new_tokens must be a positive integer, got '8'"),
    (dict(max_new_tokens=None), "max_new_tokens must be a positive integer, got None"),
    (dict(max_new_tokens=10**7), "absurdly large; use at most 1000000"),
    (dict(max_new_tokens=600), "leaves no room for the prompt in the model's context of 512 tokens"),
    (dict(max_new_tokens=510), "the prompt \\(4 tokens\\) plus max_new_tokens \\(510\\) exceeds the model's context of 512"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0 \\(0 = greedy\\), got -0.1"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(temperature=1e-300), "too close to 0 to sample from; use 0 for greedy"),
    (dict(temperature=1e5), "temperature must be in \\[0.0, 10000.0\\]"),
    (dict(temperature="0.7"), "temperature must be a finite number >= 0"),
    (dict(temperature=None), "temperature must be a finite number >= 0"),
    (dict(temperature=True), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be a number in \\(0, 1\\]"),
    (dict(top_p=-0.5), "top_p must be a number in \\(0, 1\\]"),
    (dict(top_p=1.0001), "top_p must be a number in \\(0, 1\\]"),
    (dict(top_p=math.nan), "top_p must be a number in \\(0, 1\\]"),
    (dict(top_p="all"), "top_p must be a number in \\(0, 1\\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0 \\(0 disables it\\), got -1"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(top_k=True), "top_k must be an integer >= 0"),
    (dict(top_k="5"), "top_k must be an integer >= 0"),
    (dict(seed=-1), "seed must be an integer in \\[0, 2\\*\\*64\\) or None, got -1"),
    (dict(seed=2**64), "seed must be an integer in"),
    (dict(seed=1.5), "seed must be an integer in"),
    (dict(seed="42"), "seed must be an integer in"),
    (dict(chat="yes"), "chat must be True, False or None"),
    (dict(truncate="yes"), "truncate must be True or False"),
]


@pytest.mark.parametrize("kwargs,match", BAD_GENERATION, ids=[repr(k) for k, _ in BAD_GENERATION])
def test_bad_generation_arguments(decoder, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        decoder.generate(PROMPT, **{"max_new_tokens": 4, **kwargs})


# SamplingConfig built directly (plugins, the conformance kit, bench) rejects the same values,
# NaN included; only the "too close to 0" check is the decoder's own (sampling handles tiny T).
BAD_SAMPLING = [(k, m) for k, m in BAD_GENERATION
                if set(k) <= {"temperature", "top_k", "top_p", "seed"} and "too close" not in m]


@pytest.mark.parametrize("kwargs,match", BAD_SAMPLING, ids=[repr(k) for k, _ in BAD_SAMPLING])
def test_sampling_config_built_directly_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


BAD_PROMPTS = [
    ("", "the prompt is empty"),
    ("   \n\t", "the prompt is empty"),
    ([], "the prompt is empty"),
    ((), "the prompt is empty"),
    (torch.tensor([], dtype=torch.long), "the prompt is empty"),
    (None, "prompt must be a string or a list of token ids, got NoneType"),
    (3.5, "prompt must be a string or a list of token ids, got float"),
    ({"role": "user"}, "prompt must be a string or a list of token ids, got dict"),
    (b"bytes", "prompt must be a string or a list of token ids, got bytes"),
    ([64], "token ids must be integers in \\[0, 64\\), got 64 at position 0"),
    ([3, -1], "token ids must be integers in \\[0, 64\\), got -1 at position 1"),
    ([1.0, 2.0], "token ids must be integers in \\[0, 64\\), got 1.0"),
    ([True], "got True at position 0"),
    (["hello"], "got 'hello' at position 0"),
    ([None], "got None at position 0"),
    (torch.tensor([[1, 2]]), "a tensor prompt must be 1-D token ids, got shape \\(1, 2\\)"),
    (torch.tensor([1.0, 2.0]), "a tensor prompt must be 1-D token ids"),
]


@pytest.mark.parametrize("prompt,match", BAD_PROMPTS, ids=[repr(p) for p, _ in BAD_PROMPTS])
def test_bad_prompts(decoder, prompt, match):
    with pytest.raises(ConfigError, match=match):
        decoder.generate(prompt, max_new_tokens=4)


def test_good_prompt_forms_agree(decoder):
    expected = decoder.generate(PROMPT, max_new_tokens=6).tokens
    for prompt in (tuple(PROMPT), torch.tensor(PROMPT), [np.int64(t) for t in PROMPT], np.array(PROMPT).tolist()):
        assert decoder.generate(prompt, max_new_tokens=6).tokens == expected


def test_text_prompt_without_a_tokenizer(tiny_model, registry):
    decoder = SpeculativeDecoder(tiny_model, None, drafter="none", registry=registry)
    with pytest.raises(ConfigError, match="no tokenizer, so the prompt must be a list of token ids"):
        decoder.generate("Hello", max_new_tokens=2)
    result = decoder.generate(PROMPT, max_new_tokens=2)
    assert len(result.tokens) == 2 and result.text == ""


def test_truncate_keeps_the_end_of_the_prompt(decoder, tiny_model, stub_tokenizer, registry):
    long_prompt = [(7 * i) % 64 for i in range(600)]
    with pytest.raises(ConfigError, match="pass --truncate-prompt \\(truncate=True\\) to keep the last 504"):
        decoder.generate(long_prompt, max_new_tokens=8)
    with pytest.warns(RuntimeWarning, match="cut to its last 504 tokens"):
        truncated = decoder.generate(long_prompt, max_new_tokens=8, truncate=True)
    assert truncated.tokens == decoder.generate(long_prompt[-504:], max_new_tokens=8).tokens
    with pytest.raises(ConfigError, match="leaves no room"):
        decoder.generate(long_prompt, max_new_tokens=512, truncate=True)


def test_chat_template_errors(tiny_model, stub_tokenizer, registry):
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="none", registry=registry)
    with pytest.raises(ConfigError, match="this tokenizer has no chat template.*--no-chat"):
        decoder.encode("Hello", chat=True)

    class Exploding(type(stub_tokenizer)):
        def __call__(self, text, add_special_tokens=True):
            raise UnicodeEncodeError("utf-8", text, 0, 1, "surrogates not allowed")

    decoder = SpeculativeDecoder(tiny_model, Exploding(), drafter="none", registry=registry)
    with pytest.raises(ConfigError, match="the tokenizer could not encode the prompt \\(UnicodeEncodeError"):
        decoder.encode("\ud800", chat=False)


# ---- model paths ------------------------------------------------------------------------------
def test_model_path_that_is_not_a_causal_lm(tmp_path, registry):
    from transformers import BertConfig, BertForMaskedLM

    bert_dir = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert_dir)
    with pytest.raises(ModelLoadError, match="not usable: BertLMHeadModel is an encoder-only model"):
        SpeculativeDecoder.from_pretrained(str(bert_dir), drafter="none", registry=registry)


@pytest.mark.parametrize("setup,match", [
    (lambda p: p / "does-not-exist", "is not a directory"),
    (lambda p: (p / "weights.bin").write_bytes(b"\0") and p / "weights.bin", "is not a directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
    (lambda p: ((p / "broken").mkdir(), (p / "broken" / "config.json").write_text("{not json"))
     and p / "broken", "could not load a causal LM from"),
    (lambda p: ((p / "no_type").mkdir(), (p / "no_type" / "config.json").write_text('{"hidden_size": 8}'))
     and p / "no_type", "could not load a causal LM from"),
    (lambda p: ((p / "no_weights").mkdir(), (p / "no_weights" / "config.json").write_text('{"model_type": "llama"}'))
     and p / "no_weights", "could not load a causal LM from"),
])
def test_bad_model_directories(tmp_path, registry, setup, match):
    with pytest.raises(ModelLoadError, match=match):
        SpeculativeDecoder.from_pretrained(str(setup(tmp_path)), drafter="none", registry=registry)


def test_bad_load_arguments(tiny_dir, registry):
    with pytest.raises(ConfigError, match="path must be a model directory"):
        SpeculativeDecoder.from_pretrained(123, registry=registry)
    with pytest.raises(ModelLoadError, match="unknown device 'tpu9'"):
        SpeculativeDecoder.from_pretrained(str(tiny_dir), device="tpu9", drafter="none", registry=registry)
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        SpeculativeDecoder.from_pretrained(str(tiny_dir), dtype="fp8", drafter="none", registry=registry)
    with pytest.raises(ConfigError, match="device must be a string"):
        SpeculativeDecoder.from_pretrained(str(tiny_dir), device=0, drafter="none", registry=registry)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU is available; use --device cpu"):
            SpeculativeDecoder.from_pretrained(str(tiny_dir), device="cuda", drafter="none", registry=registry)


def test_tiny_directory_loads_and_its_template_is_used(tiny_dir, registry):
    decoder = SpeculativeDecoder.from_pretrained(str(tiny_dir), drafter="none", registry=registry)
    chat, raw = decoder.encode("Hi"), decoder.encode("Hi", chat=False)
    assert len(chat) > len(raw) and decoder.generate("Hi", max_new_tokens=3).stats.new_tokens <= 3


# ---- draft heads and draft models -------------------------------------------------------------
@pytest.fixture(scope="module")
def head_path(tiny_model, tmp_path_factory):
    from specframe.heads import EarlyExitHead

    head = EarlyExitHead(tiny_model, exit_layer=2)
    return head.save_pretrained(tmp_path_factory.mktemp("head") / "tiny.safetensors")


def _early_exit(model, stub_tokenizer, registry, path, on_error="fail"):
    return SpeculativeDecoder(model, stub_tokenizer, drafter="early_exit", controller="fixed", on_error=on_error,
                              drafter_options={"head": str(path)}, registry=registry)


def test_a_good_head_works(tiny_model, stub_tokenizer, registry, head_path):
    plain = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="none", registry=registry)
    result = _early_exit(tiny_model, stub_tokenizer, registry, head_path).generate(PROMPT, max_new_tokens=12)
    assert result.tokens == plain.generate(PROMPT, max_new_tokens=12).tokens and result.stats.rounds > 0


@pytest.mark.parametrize("damage,match", [
    (lambda data: data[: len(data) // 2], "corrupt or truncated"),
    (lambda data: data[:5], "corrupt or truncated"),
    (lambda data: b"\xff" * len(data), "corrupt or truncated"),
    (lambda data: b"", "corrupt or truncated"),
])
@pytest.mark.parametrize("on_error", ["fail", "fallback"])
def test_a_damaged_head_file(tiny_model, stub_tokenizer, registry, head_path, tmp_path, damage, match, on_error):
    from specframe.heads import HeadFileError

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(damage(head_path.read_bytes()))
    decoder = _early_exit(tiny_model, stub_tokenizer, registry, broken, on_error)
    with pytest.raises(HeadFileError, match=match):
        decoder.generate(PROMPT, max_new_tokens=4)


def test_a_file_that_is_not_a_head(tiny_model, stub_tokenizer, registry, tmp_path):
    from safetensors.torch import save_file

    from specframe.heads import HeadFileError

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(HeadFileError, match="not a specframe draft head"):
        _early_exit(tiny_model, stub_tokenizer, registry, other).generate(PROMPT, max_new_tokens=4)
    with pytest.raises(HeadFileError, match="no draft head at"):
        _early_exit(tiny_model, stub_tokenizer, registry, tmp_path / "missing.safetensors").generate(PROMPT, max_new_tokens=4)


def test_a_head_for_another_model(stub_tokenizer, registry, head_path):
    other_weights = tiny_llama(init=0.3, seed=5)
    with pytest.raises(ModelMismatchError, match="was trained for another model \\(the same architecture but "
                                                 "different weights.*specframe train early-exit"):
        _early_exit(other_weights, stub_tokenizer, registry, head_path).generate(PROMPT, max_new_tokens=4)
    other_shape = tiny_llama(init=0.3, num_layers=6)
    with pytest.raises(ModelMismatchError, match="num_hidden_layers: head 4 vs model 6"):
        _early_exit(other_shape, stub_tokenizer, registry, head_path, "fallback").generate(PROMPT, max_new_tokens=4)


def test_draft_model_errors(tiny_model, stub_tokenizer, registry, tmp_path):
    def draft(model, on_error="fail"):
        return SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="draft_model", controller="fixed",
                                  drafter_options={"model": model}, on_error=on_error, registry=registry)

    with pytest.raises(ModelMismatchError, match="draft model vocabulary has 32 tokens but the target's has 64"):
        draft(tiny_llama(vocab_size=32, num_layers=1)).generate(PROMPT, max_new_tokens=4)
    with pytest.raises(ModelMismatchError, match="same tokenizer"):
        draft(tiny_llama(vocab_size=80, num_layers=1), "fallback").generate(PROMPT, max_new_tokens=4)
    with pytest.raises(ConfigError, match="draft_model needs a model: --drafter-opt model=PATH"):
        draft(None).generate(PROMPT, max_new_tokens=4)
    with pytest.raises(ModelLoadError, match="is not a directory"):
        draft(str(tmp_path / "nowhere")).generate(PROMPT, max_new_tokens=4)
    same = draft(tiny_llama(vocab_size=64, num_layers=1, seed=3, init=0.3)).generate(PROMPT, max_new_tokens=8)
    plain = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="none", registry=registry)
    assert same.tokens == plain.generate(PROMPT, max_new_tokens=8).tokens


def test_early_exit_layer_errors(tiny_model, stub_tokenizer, registry):
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="self_exit", controller="fixed",
                                 drafter_options={"layer": "4"}, registry=registry)
    with pytest.raises(SpecframeError, match=re.escape("exit layer must be in [1, 3], got 4")):
        decoder.generate(PROMPT, max_new_tokens=4)


# ---- specframe train from Python ---------------------------------------------------------------
def test_training_options_with_an_unknown_option():
    from specframe.training.options import training_options

    with pytest.raises(ConfigError, match="unknown training options 'epoch' \\(did you mean 'epochs'\\?\\)") as info:
        training_options(epoch=3)
    assert isinstance(info.value, TypeError)  # still what a bad keyword raises
    assert training_options(epochs=3).epochs == 3
    with pytest.raises(ConfigError, match="'loss' must be in"):
        training_options(loss="mse")


def test_train_data_worker_failure_says_what_failed_and_where(tmp_path):
    """A failure inside a spawned data worker reaches the user as a SpecframeError (the CLI prints
    it as one line, exit 2) that names the exception, its message and where it was raised."""
    from specframe.training.shards import ShardSettings
    from specframe.training.workers import run_workers

    class Bar:
        def set_postfix(self, **kwargs): pass
        def update(self, n): pass

    settings = ShardSettings(layers=[1], max_prompt_tokens=8, batch_size=1, top_k=4, order_seed=0, max_new_tokens=4)
    missing = tmp_path / "no_model_here"
    with pytest.raises(SpecframeError, match="worker failed: ModelLoadError: model path .* is not a directory.* "
                                             "\\(at models.py:\\d+ in load_model\\).*the same command resumes") as info:
        run_workers(str(missing), settings, tmp_path, [[(0, [])]], Bar())
    assert "--workers 1" not in str(info.value)


def test_a_worker_failure_is_described_by_type_message_and_place():
    from specframe.training.workers import describe_failure

    def deep():
        return [][5]

    try:
        deep()
    except IndexError as exc:
        text = describe_failure(exc)
    assert text.startswith("IndexError: list index out of range (at test_errors.py:")
    assert " in deep" in text


def test_train_data_worker_that_dies_silently_is_reported_not_waited_for(tmp_path):
    """A worker killed without a word (e.g. by the OOM killer) must end the wait with a clear error."""
    import queue

    from specframe.training.workers import next_worker_message

    class Worker:  # stands in for a multiprocessing.Process: only its exit code is read
        def __init__(self, exitcode):
            self.exitcode = exitcode

    done = queue.Queue()
    done.put(123)
    assert next_worker_message(done, [Worker(None)], tmp_path, poll_seconds=0.01) == 123
    with pytest.raises(SpecframeError, match="died with exit code -9 .*out-of-memory.*the same command resumes"):
        next_worker_message(done, [Worker(0), Worker(-9)], tmp_path, poll_seconds=0.01)
