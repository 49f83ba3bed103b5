"""`specframe bench`'s runners: one timed generation by Hugging Face `generate` or by specframe's
engine on the same model object, and the process's peak memory around it."""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import time
from pathlib import Path

from attrs import frozen

from .bench_methods import MethodSpec
from .errors import ConfigError


@frozen
class Outcome:
    """One timed generation."""

    tokens: list[int]
    seconds: float
    finish_reason: str
    stats: dict | None = None  # specframe's GenerationStats as a dict; for HF: rounds and new_tokens


class HFRunner:
    """Hugging Face `generate` with the same EOS set as specframe and a fresh config per call."""

    def __init__(self, model, method: MethodSpec, eos_ids: set[int], assistant=None):
        self.model, self.method, self.eos_ids, self.assistant = model, method, sorted(eos_ids), assistant
        if method.kind == "hf-assisted" and assistant is None:
            raise ConfigError("method 'hf-assisted' needs a draft model: --assistant-model PATH")
        layers = model.config.get_text_config().num_hidden_layers
        if method.kind == "hf-early-exit" and not method.hf_param < layers:
            raise ConfigError(f"{method.label}: N must be below the model's {layers} layers")

    def generate(self, ids: list[int], max_new_tokens: int, sampling: dict, seed: int) -> Outcome:
        import torch

        x = torch.tensor([ids], device=self.model.device)  # (1, T)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0],
                      attention_mask=torch.ones_like(x), **_hf_sampling(sampling))
        if self.method.kind == "hf-early-exit":
            kwargs["assistant_early_exit"] = self.method.hf_param
        elif self.method.kind == "hf-prompt-lookup":
            kwargs["prompt_lookup_num_tokens"] = self.method.hf_param
        elif self.method.kind == "hf-assisted":
            kwargs["assistant_model"] = self.assistant
        torch.manual_seed(seed)
        with restored_generation_state(self.model, self.assistant), counted_target_passes(self.model) as passes:
            started = time.perf_counter()
            out = self.model.generate(x, **kwargs)  # (1, T + new)
            tokens = out[0, len(ids):].tolist()
            seconds = time.perf_counter() - started
        finish = "eos" if tokens and tokens[-1] in self.eos_ids else "length"
        return Outcome(tokens, seconds, finish, {"rounds": passes[0], "new_tokens": len(tokens)})


def _hf_sampling(sampling: dict) -> dict:
    if sampling["temperature"] == 0:
        return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    return {"do_sample": True, "temperature": sampling["temperature"], "top_k": sampling["top_k"],
            "top_p": sampling["top_p"]}


@contextlib.contextmanager
def counted_target_passes(model):
    """Count full forward passes of `model` (prefill included) in a one-item list. Early-exit
    drafting calls the same model with `num_hidden_layers` lowered; those calls are not counted."""
    config, passes = model.config.get_text_config(), [0]
    layers = config.num_hidden_layers

    def count(module, args):
        passes[0] += config.num_hidden_layers == layers

    handle = model.register_forward_pre_hook(count)
    try:
        yield passes
    finally:
        handle.remove()


@contextlib.contextmanager
def restored_generation_state(*models):
    """transformers' assisted generation edits the models' generation_config (the heuristic draft
    length) and, for early exit, `config.num_hidden_layers` without try/finally: undo both, so
    every call starts from the same state and an interrupt cannot leave a truncated model."""
    saved = [(m, copy.deepcopy(m.generation_config), m.config.get_text_config().num_hidden_layers)
             for m in models if m is not None]
    try:
        yield
    finally:
        for model, generation_config, layers in saved:
            model.generation_config = generation_config
            model.config.get_text_config().num_hidden_layers = layers
            inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
            if inner is not None and hasattr(inner, "config"):
                inner.config.get_text_config().num_hidden_layers = layers


class SpecframeRunner:
    """A SpeculativeDecoder on the shared model; times the engine's token stream (no detokenising)."""

    def __init__(self, model, tokenizer, method: MethodSpec, assistant=None):
        from .decoder import SpeculativeDecoder

        drafter_options = method.options_of("drafter")
        if method.drafter == "draft_model" and "model" not in drafter_options and assistant is not None:
            drafter_options["model"] = assistant  # the same weights hf-assisted uses
        self.method = method
        self.decoder = SpeculativeDecoder(
            model, tokenizer, drafter=method.drafter, controller=method.controller, verifier=method.verifier,
            drafter_options=drafter_options, controller_options=method.options_of("controller"),
            verifier_options=method.options_of("verifier"))
        if not self.decoder.lossless:
            print(f"specframe bench: warning: {method.label} uses a lossy verifier; its output may differ "
                  "from plain decoding (the losslessness check will count it)", file=sys.stderr)

    def generate(self, ids: list[int], max_new_tokens: int, sampling: dict, seed: int) -> Outcome:
        started = time.perf_counter()
        stream = self.decoder.stream_tokens(ids, max_new_tokens=max_new_tokens, seed=seed, **sampling)
        tokens: list[int] = []
        try:
            while True:
                tokens += next(stream)
        except StopIteration as stop:
            stats, finish = stop.value
        seconds = time.perf_counter() - started
        record = stats.as_dict()
        record["position_accepts"] = [list(pair) for pair in stats.position_accepts]
        return Outcome(tokens, seconds, finish, record)


def build_runner(method: MethodSpec, model, tokenizer, eos_ids: set[int], assistant=None):
    if method.is_hf:
        return HFRunner(model, method, eos_ids, assistant)
    return SpecframeRunner(model, tokenizer, method, assistant)


# ---- peak memory --------------------------------------------------------------------------------
def reset_peak_memory() -> None:
    """Reset the process's peak RSS (Linux: /proc/self/clear_refs) and CUDA's peak counter."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak RSS (MiB) since the last reset; falls back to the process's lifetime peak."""
    peak = {}
    try:
        status = Path("/proc/self/status").read_text()
        peak["peak_rss_mib"] = round(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024, 1)
    except (OSError, AttributeError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        peak["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20 / 1024, 1)
    import torch

    if torch.cuda.is_available():
        peak["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak
