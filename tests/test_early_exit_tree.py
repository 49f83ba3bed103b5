"""early_exit drafting a tree (`--drafter-opt width=W`): greedy output equals plain decoding token
for token in fp32, on a tiny Llama with a head trained in the test and on the default model."""

from __future__ import annotations

import pytest
import torch

from specframe import SpeculativeDecoder
from specframe.errors import ConfigError

from .test_early_exit import train_tiny_head


@pytest.fixture(scope="module")
def tiny_head_path(tmp_path_factory, tiny_model):
    head, _, _ = train_tiny_head(tiny_model)
    return str(head.save_pretrained(tmp_path_factory.mktemp("head") / "tiny.safetensors", training_command="test"))


def _plain(model, prompt, max_new):
    return model.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new,
                          do_sample=False)[0, len(prompt):].tolist()


@pytest.mark.parametrize("width, controller, k", [(2, "fixed", 6), (3, "fixed", 9), (2, "thompson", None),
                                                  (4, "fixed", 2)])
def test_greedy_tree_drafting_equals_plain_decoding(tiny_model, stub_tokenizer, registry, tiny_head_path,
                                                    width, controller, k):
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller=controller,
                                 drafter_options={"head": tiny_head_path, "width": width}, registry=registry,
                                 controller_options={"k": k} if k else None)
    for prompt, max_new in (([5, 9, 2, 33, 5, 9], 40), ([1], 17), (list(range(3, 40)), 25)):
        expected = _plain(tiny_model, prompt, max_new)
        for _ in range(2):  # the second generation reuses the split set up by the first
            result = decoder.generate(prompt, max_new_tokens=max_new)
            assert result.tokens == expected, f"early_exit width={width} differs from plain greedy"
        assert result.stats.accepted > 0


def test_the_tree_accepts_at_least_what_the_chain_does(tiny_model, stub_tokenizer, registry, tiny_head_path):
    """Same chain, more candidates: per round, the tree commits at least the chain's tokens."""
    prompt, stats = [5, 9, 2, 33, 5, 9], {}
    for width in (1, 3):
        decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller="fixed",
                                     drafter_options={"head": tiny_head_path, "width": width}, registry=registry,
                                     controller_options={"k": 3 * width})
        stats[width] = decoder.generate(prompt, max_new_tokens=40).stats
    assert stats[3].rounds <= stats[1].rounds


def test_greedy_tree_drafting_with_a_reduced_vocabulary(tiny_model, stub_tokenizer, registry, tmp_path):
    head, _, _ = train_tiny_head(tiny_model, reduced_vocab=24)
    path = str(head.save_pretrained(tmp_path / "reduced.safetensors"))
    prompt = [5, 9, 2, 33, 5, 9]
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller="fixed",
                                 controller_options={"k": 8}, registry=registry,
                                 drafter_options={"head": path, "width": 4})
    assert decoder.generate(prompt, max_new_tokens=40).tokens == _plain(tiny_model, prompt, 40)


def test_sampling_with_a_tree_keeps_the_caches_in_step(tiny_model, stub_tokenizer, registry, tiny_head_path):
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", controller="fixed",
                                 controller_options={"k": 6}, registry=registry,
                                 drafter_options={"head": tiny_head_path, "width": 2})
    result = decoder.generate([5, 9, 2, 33, 5, 9], max_new_tokens=40, temperature=0.8, seed=3)
    assert len(result.tokens) == 40 and result.stats.accepted > 0


@pytest.mark.parametrize("width", [0, 9, -1])
def test_a_bad_width_is_a_config_error(stub_tokenizer, registry, tiny_model, width):
    with pytest.raises(ConfigError, match="width"):
        SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="early_exit", drafter_options={"width": width},
                           registry=registry)


@pytest.fixture(scope="module")
def default_model_fp32():
    from specframe.models import load_model

    return load_model(dtype="fp32")


@pytest.mark.slow
@pytest.mark.parametrize("width, text", [(2, "Write a haiku about the sea."), (3, "Explain what a hash table is.")])
def test_default_model_greedy_tree_equality_with_the_shipped_head(default_model_fp32, registry, width, text):
    model, tokenizer = default_model_fp32
    expected = SpeculativeDecoder(model, tokenizer, drafter=None, registry=registry).generate(
        text, max_new_tokens=32).tokens
    decoder = SpeculativeDecoder(model, tokenizer, drafter="early_exit", controller="fixed", registry=registry,
                                 controller_options={"k": 3 * width}, drafter_options={"width": width})
    result = decoder.generate(text, max_new_tokens=32)
    assert result.tokens == expected
    assert result.stats.accepted > 0


@pytest.mark.parametrize("width, temperature", [(2, 0.8)])  # 4 tokens and (3, 1.3) pass too, in minutes
def test_sampling_with_a_tree_is_exactly_the_target_distribution(width, temperature):
    """Every draw enumerated through the engine (`specframe.testing.exact`) on a 4-token toy Llama:
    rounds of a chain of 2 with width - 1 alternatives beside each token; q is float32, hence the
    tolerance. This toy does not see alternatives given the parent's q instead of their own (the
    bias is below the tolerance here); the row check below does, and the verifier's enumeration
    (test_tree_verifier_exact.py) shows those rows are exact."""
    from specframe.plugins import PluginRegistry
    from specframe.testing import autoregressive_distribution, engine_distribution, largest_difference
    from specframe.testing.common import FLOAT32_TOLERANCE
    from specframe.types import SamplingConfig

    from .conftest import tiny_llama
    from .test_lossless_sampling import PROMPT

    toy = tiny_llama(vocab_size=4, num_layers=2, hidden_size=16, seed=3, init=0.6)
    head, _, _ = train_tiny_head(toy, layer=1, steps_epochs=2)
    registry, config = PluginRegistry(autoload=False), SamplingConfig(temperature=temperature)
    parts = lambda: (registry.create("drafter", "early_exit", {"head": head, "width": width}),  # noqa: E731
                     registry.create("controller", "fixed", {"k": 2 * width}),
                     registry.create("verifier", "speculative", {}))
    got = engine_distribution(toy, parts, PROMPT, 3, config)  # two rounds at most
    expected = autoregressive_distribution(toy, PROMPT, 3, config)
    assert largest_difference(got, expected)[0] <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("width", [2, 3, 5])
def test_tree_drafting_gives_each_node_the_q_it_was_drawn_from(width):
    """The chain node's row is the drafter's q; each alternative's row is q without the siblings
    drawn before it, renormalised (what the tree verifier is exact for)."""
    from specframe.drafters.tree_drafting import draft_tree_with
    from specframe.sampling import Sampler
    from specframe.types import SamplingConfig

    logits_of = {t: torch.randn(6, generator=torch.Generator().manual_seed(t)) for t in range(6)}
    sampler = Sampler(SamplingConfig(temperature=0.9, seed=1))
    keep = type("Keep", (), {"keep_drafting": lambda self, i, c: True})()
    draft = draft_tree_with(lambda t: logits_of[t], 0, 3 * width, width, keep, sampler)
    chain_length = 3
    assert draft.parents[:chain_length] == (-1, 0, 1)
    for node, parent in enumerate(draft.parents):
        parent_token = 0 if parent == -1 else int(draft.tokens[parent])
        q = sampler.probs(logits_of[parent_token][None])[0]
        siblings = [n for n, p in enumerate(draft.parents) if p == parent]
        earlier = siblings[: siblings.index(node)]
        expected = q.clone()
        expected[draft.tokens[earlier]] = 0
        torch.testing.assert_close(draft.q[node], expected / expected.sum())
    assert len(set(draft.tokens[[n for n, p in enumerate(draft.parents) if p == -1]].tolist())) == width
