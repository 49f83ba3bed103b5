"""The Python entry point: SpeculativeDecoder wraps any Hugging Face causal LM.

Every argument is checked before any work is done: a bad value raises a `SpecframeError`
subclass (mostly `ConfigError`) whose message names the argument, the value and what to do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import attrs
import torch

from .checks import is_int
from .engine import ON_ERROR_CHOICES, Parts, StatsRecorder, generate_tokens
from .errors import ConfigError, ModelLoadError, SpecframeError
from .interfaces import is_lossless
from .kernels import generation_threads
from .models import context_length, eos_token_ids
from .plugins import PluginRegistry, get_registry
from .prompts import encode_prompt, fit_context
from .sampling import Sampler
from .target import TargetModel
from .types import GenerationResult, GenerationStats, SamplingConfig, is_real

DEFAULT_DRAFTER = "early_exit"
DEFAULT_CONTROLLER = "thompson_cost"  # cost-aware Thompson sampling: measured best here, docs/eesd.md
DEFAULT_VERIFIER = "auto"
PLAIN = "none"  # drafter name for plain autoregressive decoding through the same engine
MAX_NEW_TOKENS_LIMIT = 1_000_000
MIN_TEMPERATURE = 1e-6  # below this (but > 0) float32 sampling gains nothing over greedy and risks overflow


class SpeculativeDecoder:
    """Lossless speculative decoding on a Hugging Face causal LM.

    >>> decoder = SpeculativeDecoder(model, tokenizer, drafter="ngram", controller="fixed")
    >>> decoder.generate("Explain what a hash table is.", max_new_tokens=64).text

    drafter="none" decodes plainly through the same engine (None, the old spelling, still works).
    on_error: "fail" raises `PluginContractError` when a part breaks its contract; "fallback"
    finishes that generation with plain decoding and a `RuntimeWarning` (same output).
    """

    def __init__(self, model, tokenizer, drafter: str = DEFAULT_DRAFTER,
                 controller: str = DEFAULT_CONTROLLER, verifier: str = DEFAULT_VERIFIER,
                 drafter_options: dict | None = None, controller_options: dict | None = None,
                 verifier_options: dict | None = None, on_error: str = "fail",
                 registry: PluginRegistry | None = None):
        if not isinstance(on_error, str) or on_error not in ON_ERROR_CHOICES:
            raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        _check_model(model)
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise ConfigError(f"tokenizer must be a Hugging Face tokenizer (with a decode method) or None (token-id "
                              f"prompts only), got {type(tokenizer).__name__}; load one with AutoTokenizer.from_pretrained(PATH)")
        if registry is not None and not isinstance(registry, PluginRegistry):
            raise ConfigError(f"registry must be a specframe.plugins.PluginRegistry or None, got {type(registry).__name__}")
        registry = registry or get_registry()
        plain = drafter is None or drafter == PLAIN
        chosen = {"drafter": PLAIN if plain else drafter, "controller": controller, "verifier": verifier}
        options = {"drafter": drafter_options, "controller": controller_options, "verifier": verifier_options}
        for kind, name in chosen.items():
            if not isinstance(name, str):
                raise ConfigError(f"{kind} must be a name (a string such as {registry.names(kind)[:3]}), "
                                  f"got {name!r}; run `specframe plugins` to list every name")
            if options[kind] is not None and not isinstance(options[kind], Mapping):
                raise ConfigError(f"{kind}_options must be a dict of option names to values, got {options[kind]!r}")
        self.tokenizer, self.on_error = tokenizer, on_error
        self.target = TargetModel(model)
        parts = {kind: None if kind == "drafter" and plain else registry.create(kind, name, options[kind])
                 for kind, name in chosen.items()}
        self.parts = Parts(
            target=self.target, drafter=parts["drafter"], controller=parts["controller"],
            verifier=parts["verifier"], names=chosen,
            plugins={kind: registry.get(kind, name).plugin for kind, name in chosen.items() if parts[kind] is not None},
        )
        self.lossless = is_lossless(self.parts.verifier)
        self.last_result: GenerationResult | None = None

    @classmethod
    def from_pretrained(cls, path=None, device="auto", dtype="auto", **kwargs) -> "SpeculativeDecoder":
        """Load a local HF model directory (or the embedded default model when path is None)."""
        from .models import load_model

        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"path must be a model directory (a string or a Path) or None, got {path!r}")
        for name, value in (("device", device), ("dtype", dtype)):
            if not isinstance(value, (str, torch.device, torch.dtype)):
                raise ConfigError(f"{name} must be a string such as 'auto', got {value!r}")
        if str(device).split(":")[0] == "meta":
            raise ConfigError(f"device {str(device)!r} holds no weights, so it cannot generate; use auto, cpu or cuda")
        try:
            with _quiet_transformers():
                model, tokenizer = load_model(path, device=device, dtype=dtype)
        except SpecframeError:
            raise
        except Exception as exc:  # transformers raises many types for a directory it cannot use
            where = "the default model" if path is None else repr(str(path))
            raise ModelLoadError(f"could not load a causal LM from {where} on device {device!r}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        try:
            _check_model(model)
        except ConfigError as exc:
            raise ModelLoadError(f"the model in {str(path)!r} is not usable: {exc}") from None
        return cls(model, tokenizer, **kwargs)

    # ---- prompts ----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt; a chat template is applied when the tokenizer has one (chat=None)."""
        return encode_prompt(prompt, self.tokenizer, self.target.vocab_size, chat)

    # ---- generation --------------------------------------------------------------------------
    def stream_tokens(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int | None = None, chat: bool | None = None,
                      truncate: bool = False, *, recorder: StatsRecorder | None = None):
        """Yield lists of token ids as they are committed; returns (stats, finish_reason).

        truncate=True keeps only the end of a prompt too long for the model's context (with a
        warning) instead of raising. Pass a `StatsRecorder` as `recorder` to read the statistics
        so far if the generation is interrupted.
        """
        config = sampling_config(temperature, top_k, top_p, seed)
        check_max_new_tokens(max_new_tokens)
        if not isinstance(truncate, bool):
            raise ConfigError(f"truncate must be True or False, got {truncate!r}")
        ids = fit_context(self.encode(prompt, chat), max_new_tokens, context_length(self.target.config), truncate)
        sampler = Sampler(config, device=self.target.device)
        eos = eos_token_ids(self.tokenizer, self.target.model)
        steps = generate_tokens(self.parts, ids, sampler, max_new_tokens, eos, self.on_error, recorder)
        return (yield from generation_threads(steps, self.target.device))  # threads from the load: docs/benchmarks.md

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield text as it is committed. After the loop, `self.last_result` holds the result,
        also when the generation was interrupted (finish_reason "interrupted") or failed ("error")."""
        tokens: list[int] = []
        shown = ""
        recorder = StatsRecorder()
        generator = self.stream_tokens(prompt, recorder=recorder, **kwargs)
        finish, stats = "error", None
        try:
            while True:
                tokens += next(generator)
                text = self._decode(tokens)
                if not text.endswith("\ufffd") and len(text) > len(shown):  # hold back split UTF-8
                    yield text[len(shown):]
                    shown = text
        except StopIteration as stop:
            stats, finish = stop.value
        except KeyboardInterrupt:
            finish = "interrupted"
            raise
        finally:
            text = self._decode(tokens)
            if stats is None:
                stats = _partial_stats(recorder, tokens)
            self.last_result = GenerationResult(tokens, text, stats, finish)
        if len(text) > len(shown):
            yield text[len(shown):]

    def _decode(self, tokens: list[int]) -> str:
        """The text of `tokens` ("" without a tokenizer)."""
        return "" if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=True)

    def generate(self, prompt, **kwargs) -> GenerationResult:
        """Generate a whole answer; returns tokens, text and statistics."""
        for _ in self.stream(prompt, **kwargs):
            pass
        return self.last_result


@contextlib.contextmanager
def _quiet_transformers():
    """No 'Loading weights' progress bars or advice logs from transformers while loading."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---- argument checks -------------------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"model must be a Hugging Face causal LM (a PreTrainedModel), got {type(model).__name__}; "
                          "to load one from a directory use SpeculativeDecoder.from_pretrained(PATH)")
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        raise ConfigError(f"{type(model).__name__} is not a causal language model (it cannot generate); "
                          "load the model with AutoModelForCausalLM")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder model ({config.model_type}); specframe "
                          "needs a decoder-only causal LM such as Llama, Qwen or GPT-2")
    if _encoder_only(config):
        raise ConfigError(f"{type(model).__name__} is an encoder-only model ({config.model_type}, bidirectional "
                          "attention, is_decoder=False), not a causal LM; use a decoder-only causal LM such as "
                          "Llama, Qwen or GPT-2")
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ConfigError(f"{type(model).__name__} has no parameters, so it is not a usable language model")
    if parameter.is_meta:
        raise ConfigError(f"{type(model).__name__} is on the meta device (no weights); load it onto cpu or cuda")


def _encoder_only(config) -> bool:
    """A masked-LM architecture (BERT, RoBERTa, ...) that AutoModelForCausalLM loads, but which
    only attends causally when its config says is_decoder=True (XLM: causal=True)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as masked
    except ImportError:  # pragma: no cover - a transformers without this table
        return False
    model_type = getattr(config, "model_type", None)
    return model_type in masked and not (getattr(config, "is_decoder", False) or getattr(config, "causal", False))


def sampling_config(temperature, top_k, top_p, seed) -> SamplingConfig:
    """A SamplingConfig from user values, with a ConfigError for each bad one.

    SamplingConfig checks every value; the decoder also refuses tiny positive temperatures.
    """
    if is_real(temperature) and 0 < temperature < MIN_TEMPERATURE:
        raise ConfigError(f"temperature {temperature!r} is too close to 0 to sample from; use 0 for greedy "
                          f"decoding or a temperature >= {MIN_TEMPERATURE}")
    SamplingConfig(temperature, top_k, top_p, seed)  # raises the ConfigError for a bad value
    return SamplingConfig(float(temperature), int(top_k), float(top_p), None if seed is None else int(seed))


def check_max_new_tokens(max_new_tokens) -> None:
    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is absurdly large; use at most {MAX_NEW_TOKENS_LIMIT}")


def _partial_stats(recorder: StatsRecorder, tokens: list[int]) -> GenerationStats:
    """The statistics of an interrupted generation: the rounds finished so far."""
    return attrs.evolve(recorder.finish(), new_tokens=len(tokens))

