"""Prompts as token ids: text through the tokenizer (and its chat template), or ids checked
against the vocabulary; fitted to the model's context."""

from __future__ import annotations

import warnings

import torch

from .checks import is_int
from .errors import ConfigError


def encode_prompt(prompt, tokenizer, vocab_size: int, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt: text (with the tokenizer's chat template when it has one and chat is
    None), or ids, each checked to lie below `vocab_size`."""
    if chat is not None and not isinstance(chat, bool):
        raise ConfigError(f"chat must be True, False or None (use the template when there is one), got {chat!r}")
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex():
            raise ConfigError(f"a tensor prompt must be 1-D token ids, got shape {tuple(prompt.shape)} "
                              f"and dtype {prompt.dtype}")
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        ids = _check_ids(prompt, vocab_size)
    elif isinstance(prompt, str):
        ids = _encode_text(tokenizer, prompt, chat)
    else:
        raise ConfigError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ConfigError("the prompt is empty (no tokens); give some text (or token ids) to continue")
    return ids

def _check_ids(prompt, vocab_size: int) -> list[int]:
    for position, token in enumerate(prompt):
        if not is_int(token) or not 0 <= token < vocab_size:
            raise ConfigError(f"token ids must be integers in [0, {vocab_size}), got {token!r} at position "
                              f"{position} of the prompt; encode text with the model's tokenizer")
    return [int(t) for t in prompt]

def _encode_text(tokenizer, prompt: str, chat: bool | None) -> list[int]:
    if tokenizer is None:
        raise ConfigError("this decoder has no tokenizer, so the prompt must be a list of token ids; "
                          "pass a tokenizer to SpeculativeDecoder to use text prompts")
    if not prompt.strip():
        raise ConfigError("the prompt is empty; give some text to continue")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ConfigError("this tokenizer has no chat template, so --chat (chat=True) cannot be used; "
                          "run with --no-chat (chat=False) to use the prompt as raw text")
    try:
        if chat or (chat is None and has_template):
            messages = [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = [int(t) for t in ids]
    except Exception as exc:  # e.g. text the tokenizer cannot encode (lone surrogates)
        raise ConfigError(f"the tokenizer could not encode the prompt ({type(exc).__name__}: {exc}); "
                          "check that the prompt is valid text") from exc
    return ids


def fit_context(ids: list[int], max_new_tokens: int, context: int | None, truncate: bool) -> list[int]:
    """The prompt ids, checked (or, with truncate, cut from the front) to fit a context of
    `context` tokens (None: no limit)."""
    if not context or len(ids) + max_new_tokens <= context:
        return ids
    if max_new_tokens >= context:
        raise ConfigError(f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt in the model's "
                          f"context of {context} tokens; use --max-new-tokens {context - 1} or fewer")
    if not truncate:
        raise ConfigError(
            f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {context} tokens; shorten the prompt, lower --max-new-tokens, or pass --truncate-prompt "
            f"(truncate=True) to keep the last {context - max_new_tokens} prompt tokens"
        )
    keep = context - max_new_tokens
    warnings.warn(f"the prompt ({len(ids)} tokens) was cut to its last {keep} tokens to fit the model's context "
                  f"of {context} with max_new_tokens={max_new_tokens}", RuntimeWarning, stacklevel=3)
    return ids[-keep:]
