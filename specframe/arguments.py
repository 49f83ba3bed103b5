"""Command-line options that several commands share, declared once (run, bench, costs, train)."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def _dtype_help() -> str:
    """The per-dtype guarantee, word for word as in the README and docs/numerics.md."""
    from .numerics import GUARANTEES

    return ("weights dtype (default auto = fp32, the exact one; bf16 is the opt-in, see docs/numerics.md). "
            + " ".join(GUARANTEES.values()))


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--model, --device and --dtype, in a group titled "model" (returned, to add more to it)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, metavar="PATH",
                       help="a local Hugging Face causal LM directory (default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help=_dtype_help())
    return group


def add_generation_arguments(parser: argparse.ArgumentParser, seed_default: int | None = None,
                             seed_help: str = "seed for sampling and for controllers") -> argparse._ArgumentGroup:
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed and --chat/--no-chat, in a group
    titled "generation" (returned, to add more to it)."""
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="0 = greedy (default; output identical to plain decoding); > 0 samples")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    group.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    chat = group.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the tokenizer's chat template (default when it has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="use the prompt as raw text")
    return group
