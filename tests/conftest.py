"""Shared fixtures: tiny random Llama models (fast) and the real default model (slow, cached)."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from transformers import LlamaForCausalLM

os.environ.setdefault("SPECFRAME_DISABLE_PLUGIN_AUTOLOAD", "1")  # tests opt in to entry points
torch.set_num_threads(1)  # tiny models are dominated by thread overhead; also fair on shared cores

from specframe.plugins import PluginRegistry  # noqa: E402
from specframe.testing import tiny_llama as kit_tiny_llama  # noqa: E402


class StubTokenizer:
    """Enough of a tokenizer for token-id prompts."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


# the kit's tiny Llama with the suite's defaults: 64 tokens, 4 layers, unscaled logits, 512 positions
tiny_llama = functools.partial(kit_tiny_llama, vocab_size=64, num_layers=4, logit_scale=1.0, max_positions=512)


@pytest.fixture(scope="session")
def registry() -> PluginRegistry:
    return PluginRegistry(autoload=False)


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    """Large initialisation so that distributions are peaked and early exits disagree."""
    return tiny_llama(init=0.3)


@pytest.fixture(scope="session")
def stub_tokenizer() -> StubTokenizer:
    return StubTokenizer()


def pytest_configure(config):
    config.addinivalue_line("markers", "auto_dtype: exercises `--dtype auto`; CI runs these a second time with "
                            "SPECFRAME_ASSUME_BF16=1, so a CPU without bf16 units still tests the bf16 path")


def _load_default_model(dtype: str):
    from specframe.models import load_model

    return load_model(dtype=dtype)


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct in fp32, loaded once per test session. Tests of token-for-token
    equality use it: fp32 is the dtype whose guarantee is exact equality (docs/numerics.md)."""
    return _load_default_model("fp32")


@pytest.fixture(scope="session")
def default_model_bf16():
    """The real default model in bf16 (emulated, slowly, on a CPU without bf16 units)."""
    return _load_default_model("bf16")


@pytest.fixture(scope="session")
def default_model_auto():
    """The real default model as `--dtype auto` loads it here (SPECFRAME_ASSUME_BF16 changes that)."""
    return _load_default_model("auto")
