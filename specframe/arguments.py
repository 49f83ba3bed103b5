"""Command-line options that several commands share, declared once (run, bench, costs, train)."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--model, --device and --dtype, in a group titled "model" (returned, to add more to it)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, metavar="PATH",
                       help="a local Hugging Face causal LM directory (default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="weights dtype; lossless means against plain decoding in the same dtype")
    return group
