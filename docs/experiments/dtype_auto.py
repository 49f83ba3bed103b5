"""Experiment (issue 14): what should `--dtype auto` choose on a CPU with bf16 units?

Plain decoding and the default EESD, each in fp32 and in bf16, interleaved prompt by prompt in
one process (the order rotates), one thread, after a warm-up; prints tokens/s per setting and the
mean per-prompt ratio to fp32 plain decoding, and greedy mismatches against plain decoding of
the same dtype. On a shared machine the absolute figures are contended; compare the ratios.

    python docs/experiments/dtype_auto.py [PROMPTS] [TOKENS]   # defaults 8 96

Results are in docs/numerics.md.
"""
import sys
import time

import torch

from specframe.bench import load_prompts
from specframe.decoder import SpeculativeDecoder
from specframe.models import load_model

torch.set_num_threads(1)
PROMPTS, TOKENS = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (8, 96)
settings = {}
for dtype in ("fp32", "bf16"):
    model, tokenizer = load_model(None, dtype=dtype)
    settings[f"plain {dtype}"] = SpeculativeDecoder(model, tokenizer, drafter=None, controller="fixed")
    settings[f"eesd {dtype}"] = SpeculativeDecoder(model, tokenizer)
names = list(settings)
for decoder in settings.values():  # warm-up
    decoder.generate("Hello.", max_new_tokens=8)
speed = {name: [] for name in names}
tokens = {name: [] for name in names}
for index, prompt in enumerate(load_prompts("benchmarks/spec_bench/question.jsonl", None, PROMPTS)):
    order = names[index % len(names):] + names[:index % len(names)]
    for name in order:
        start = time.perf_counter()
        result = settings[name].generate(prompt.text, max_new_tokens=TOKENS)
        speed[name].append(len(result.tokens) / (time.perf_counter() - start))
        tokens[name].append(result.tokens)
base = speed["plain fp32"]
for name in names:
    ratio = sum(s / b for s, b in zip(speed[name], base)) / len(base)
    plain = tokens["plain " + name.split()[1]]
    mismatches = sum(a != b for a, b in zip(tokens[name], plain))
    print(f"{name:11s} {sum(speed[name]) / len(base):6.1f} tokens/s  {ratio:.2f}x plain fp32  "
          f"greedy mismatches vs plain {name.split()[1]}: {mismatches}/{len(base)}")
