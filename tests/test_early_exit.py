"""The early_exit drafter (EESD): lossless greedy and sampled decoding with a trained head.

A tiny random Llama gets a head trained in the test (seconds); the real default model uses the
shipped head.
"""

from __future__ import annotations

import pytest
import torch

from specframe import SpeculativeDecoder
from specframe.training.dataset import DistillSet
from specframe.training.head import HeadTraining, evaluate, reduced_vocabulary, train_head
from specframe.training.shards import ShardSettings, teacher_forced_shard

from .conftest import tiny_llama
from .test_lossless_sampling import EXACT_LENGTH, PROMPT

EXIT_LAYER = 2


def greedy_sequences(model, count: int, prompt_length: int, new_tokens: int, seed: int = 0) -> list[list[int]]:
    """The model's own greedy continuations of random prompts (on-distribution training data)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (count, prompt_length), generator=generator)
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    return out.tolist()


def train_tiny_head(model, layer: int = EXIT_LAYER, steps_epochs: int = 24, reduced_vocab: int = 0):
    """A head trained by self-distillation on the model's own greedy outputs, in a few seconds."""
    sequences = greedy_sequences(model, 96, 6, 24)
    settings = ShardSettings(layers=[layer], max_prompt_tokens=6, batch_size=len(sequences), top_k=16, order_seed=0,
                             max_answer_tokens=24)
    shard = teacher_forced_shard(model, sequences, [6] * len(sequences), settings)
    data = DistillSet.from_shards([shard], layer)
    config = HeadTraining(layer=layer, epochs=steps_epochs, lr=3e-3, tokens_per_batch=512, eval_points=0, loss="kl+ce")
    vocab_ids = reduced_vocabulary([data], reduced_vocab, [], model.config.vocab_size) if reduced_vocab else None
    head, _, vocab_map = train_head(model, data, None, config, vocab_ids)
    return head, data, vocab_map


@pytest.fixture(scope="module")
def tiny_trained(tiny_model):
    return train_tiny_head(tiny_model)


@pytest.fixture(scope="module")
def tiny_head_path(tmp_path_factory, tiny_trained):
    head, _, _ = tiny_trained
    return str(head.save_pretrained(tmp_path_factory.mktemp("head") / "tiny.safetensors", training_command="test"))


def test_training_raises_agreement_above_the_untrained_exit(tiny_model, tiny_trained):
    head, data, vocab_map = tiny_trained
    trained = evaluate(head, data, vocab_map, torch.device("cpu"))["answer_acceptance"]
    untrained, _, _ = train_tiny_head(tiny_model, steps_epochs=0)
    baseline = evaluate(untrained, data, None, torch.device("cpu"))["answer_acceptance"]
    assert trained > baseline + 0.1, (trained, baseline)


@pytest.mark.parametrize("controller", ["fixed", "thompson", "thompson_calibrated", "thompson_cost"])
def test_greedy_equality_on_a_tiny_model(tiny_model, stub_tokenizer, registry, tiny_head_path, controller):
    if controller not in registry.names("controller"):
        pytest.skip(f"controller {controller} is not registered")
    for prompt, max_new in (([5, 9, 2, 33, 5, 9], 40), ([1], 17), (list(range(3, 40)), 25)):
        expected = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new,
                                       do_sample=False)[0, len(prompt):].tolist()
        decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller=controller,
                                     drafter_options={"head": tiny_head_path}, registry=registry)
        for _ in range(2):  # the second generation reuses the split set up by the first
            result = decoder.generate(prompt, max_new_tokens=max_new)
            assert result.tokens == expected, f"early_exit+{controller} differs from plain greedy"
        if controller == "fixed":  # the cost-aware controller may rightly decide not to draft
            assert result.stats.accepted > 0, "the trained head never had a draft accepted"


@pytest.mark.parametrize("context_vocab", [False, True])
def test_greedy_equality_with_a_reduced_vocabulary(tiny_model, stub_tokenizer, registry, tmp_path, context_vocab):
    head, _, _ = train_tiny_head(tiny_model, reduced_vocab=24)
    path = str(head.save_pretrained(tmp_path / "reduced.safetensors"))
    prompt = [5, 9, 2, 33, 5, 9]
    expected = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40,
                                   do_sample=False)[0, len(prompt):].tolist()
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller="fixed",
                                 controller_options={"k": 4}, registry=registry,
                                 drafter_options={"head": path, "context_vocab": context_vocab})
    assert decoder.generate(prompt, max_new_tokens=40).tokens == expected


@pytest.fixture(scope="module")
def toy_head_path(tmp_path_factory):
    from .test_lossless_sampling import V  # noqa: F401  (the toy's vocabulary)

    toy = tiny_llama(vocab_size=4, num_layers=2, hidden_size=16, seed=3, init=0.6)
    head, _, _ = train_tiny_head(toy, layer=1, steps_epochs=2)
    return str(head.save_pretrained(tmp_path_factory.mktemp("toyhead") / "toy.safetensors"))


@pytest.mark.parametrize("full_vocab", [True, False])
def test_speculative_sampling_with_early_exit_is_exactly_the_target_distribution(toy_head_path, full_vocab, tmp_path):
    """Every draw enumerated through the engine (`specframe.testing.exact`): rounds of 2 drafts at
    T = 0.8, top-k 2; q is float32, hence the tolerance."""
    from specframe.heads import EarlyExitHead
    from specframe.plugins import PluginRegistry
    from specframe.testing import autoregressive_distribution, engine_distribution, largest_difference
    from specframe.testing.common import FLOAT32_TOLERANCE
    from specframe.types import SamplingConfig

    toy = tiny_llama(vocab_size=4, num_layers=2, hidden_size=16, seed=3, init=0.6)
    path = toy_head_path
    if not full_vocab:  # q is zero outside a 3-token vocabulary: still exact
        head = EarlyExitHead.from_pretrained(toy_head_path, toy)
        head.vocab_ids = torch.tensor([0, 1, 3])
        path = str(head.save_pretrained(tmp_path / "reduced.safetensors"))
    registry, config = PluginRegistry(autoload=False), SamplingConfig(temperature=0.8, top_k=2)
    parts = lambda: (registry.create("drafter", "early_exit", {"head": path}),  # noqa: E731
                     registry.create("controller", "fixed", {"k": 3}), registry.create("verifier", "speculative", {}))
    got = engine_distribution(toy, parts, PROMPT, EXACT_LENGTH, config)
    expected = autoregressive_distribution(toy, PROMPT, EXACT_LENGTH, config)
    assert largest_difference(got, expected)[0] <= FLOAT32_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("controller", ["thompson", "fixed"])
def test_default_model_greedy_equality_with_the_shipped_head(default_model, controller, registry):
    model, tokenizer = default_model
    assert model.dtype == torch.float32, "token-for-token equality is the fp32 guarantee (docs/numerics.md)"
    prompts = ["Write a haiku about the sea.", "Explain what a hash table is."]
    for text in prompts:
        decoder = SpeculativeDecoder(model, tokenizer, drafter=None, controller="fixed", registry=registry)
        expected = decoder.generate(text, max_new_tokens=48).tokens
        decoder = SpeculativeDecoder(model, tokenizer, drafter="early_exit", controller=controller, registry=registry)
        result = decoder.generate(text, max_new_tokens=48)
        assert result.tokens == expected, f"early_exit+{controller} differs from plain greedy on {text!r}"


def test_the_train_command_parses_and_records_every_option():
    import argparse

    from specframe.training.command import add_arguments, canonical_command, options_from, run

    parser = argparse.ArgumentParser(prog="specframe train")
    add_arguments(parser)
    args = parser.parse_args(["early-exit", "--layer", "4", "--loss", "ce", "--store-layers", "2", "4",
                              "--dtype", "bf16"])
    command = canonical_command(options_from(args))
    assert command.startswith("specframe train early-exit ")
    assert "--layer 4" in command and "--loss ce" in command and "--store-layers 2 4" in command
    assert "--seed 0" in command and "--dtype bf16" in command and "--data-only" not in command
    assert run(parser.parse_args([])) == 2  # no kind given: a clear error, not a traceback
