"""The Python entry point: SpeculativeDecoder wraps any Hugging Face causal LM."""

from __future__ import annotations

import time
from collections.abc import Iterator


from .engine import ON_ERROR_CHOICES, Parts, generate_tokens
from .errors import ConfigError
from .plugins import PluginRegistry, get_registry
from .sampling import Sampler
from .target import TargetModel
from .types import GenerationResult, GenerationStats, SamplingConfig

DEFAULT_DRAFTER = "early_exit"
DEFAULT_CONTROLLER = "thompson"
DEFAULT_VERIFIER = "auto"
PLAIN = "none"  # drafter name for plain autoregressive decoding through the same engine
MAX_NEW_TOKENS_LIMIT = 1_000_000


class SpeculativeDecoder:
    """Lossless speculative decoding on a Hugging Face causal LM.

    >>> decoder = SpeculativeDecoder(model, tokenizer, drafter="ngram", controller="fixed")
    >>> decoder.generate("Explain what a hash table is.", max_new_tokens=64).text
    """

    def __init__(self, model, tokenizer, drafter: str | None = DEFAULT_DRAFTER,
                 controller: str = DEFAULT_CONTROLLER, verifier: str = DEFAULT_VERIFIER,
                 drafter_options: dict | None = None, controller_options: dict | None = None,
                 verifier_options: dict | None = None, on_error: str = "fail",
                 registry: PluginRegistry | None = None):
        if on_error not in ON_ERROR_CHOICES:
            raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        registry = registry or get_registry()
        self.tokenizer, self.on_error = tokenizer, on_error
        self.target = TargetModel(model)
        plain = drafter in (None, PLAIN)
        self.parts = Parts(
            target=self.target,
            drafter=None if plain else registry.create("drafter", drafter, drafter_options),
            controller=registry.create("controller", controller, controller_options),
            verifier=registry.create("verifier", verifier, verifier_options),
            names={"drafter": drafter or PLAIN, "controller": controller, "verifier": verifier},
        )
        self.lossless = getattr(self.parts.verifier, "lossless", True)

    @classmethod
    def from_pretrained(cls, path=None, device="auto", dtype="auto", **kwargs) -> "SpeculativeDecoder":
        """Load a local HF model directory (or the embedded default model when path is None)."""
        from .models import load_model

        model, tokenizer = load_model(path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    # ---- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt; a chat template is applied when the tokenizer has one (chat=None)."""
        if isinstance(prompt, (list, tuple)):
            ids = [int(t) for t in prompt]
        elif isinstance(prompt, str):
            ids = self._encode_text(prompt, chat)
        else:
            raise ConfigError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ConfigError("the prompt is empty; give some text (or token ids) to continue")
        return ids

    def _encode_text(self, prompt: str, chat: bool | None) -> list[int]:
        if not prompt.strip():
            raise ConfigError("the prompt is empty; give some text to continue")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ConfigError("this tokenizer has no chat template; run without --chat (use --no-chat)")
        if chat or (chat is None and has_template):
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    # ---- generation --------------------------------------------------------------------------
    def stream_tokens(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int | None = None, chat: bool | None = None):
        """Yield lists of token ids as they are committed; returns (stats, finish_reason)."""
        ids = self.encode(prompt, chat)
        _check_length(ids, max_new_tokens, self.target)
        sampler = Sampler(SamplingConfig(temperature, top_k, top_p, seed), device=self.target.device)
        eos = _eos_ids(self.tokenizer, self.target.model)
        return (yield from generate_tokens(self.parts, ids, sampler, max_new_tokens, eos, self.on_error))

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield text as it is committed. After the loop, `self.last_result` holds the result."""
        tokens: list[int] = []
        shown = ""
        started = time.perf_counter()
        generator = self.stream_tokens(prompt, **kwargs)
        finish, stats = "interrupted", None
        try:
            while True:
                tokens += next(generator)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(shown):  # hold back split UTF-8
                    yield text[len(shown):]
                    shown = text
        except StopIteration as stop:
            stats, finish = stop.value
        finally:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if stats is None:
                stats = _partial_stats(tokens, started)
            self.last_result = GenerationResult(tokens, text, stats, finish)
        if len(text) > len(shown):
            yield text[len(shown):]

    def generate(self, prompt, **kwargs) -> GenerationResult:
        """Generate a whole answer; returns tokens, text and statistics."""
        for _ in self.stream(prompt, **kwargs):
            pass
        return self.last_result


def _partial_stats(tokens: list[int], started: float) -> GenerationStats:
    return GenerationStats(rounds=0, drafted=0, accepted=0, new_tokens=len(tokens), draft_seconds=0.0,
                           verify_seconds=0.0, total_seconds=time.perf_counter() - started)


def _eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _check_length(ids: list[int], max_new_tokens: int, target: TargetModel) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is absurdly large; use at most {MAX_NEW_TOKENS_LIMIT}")
    context = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if context and len(ids) + max_new_tokens > context:
        raise ConfigError(
            f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {context} tokens; shorten the prompt or lower --max-new-tokens"
        )
