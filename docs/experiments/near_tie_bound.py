"""Experiment (issue 14): how far do two roundings of the same position move the top-2 gap in bf16,
and where do speculative greedy outputs first part from plain greedy ones?

1. Rounding noise: plain bf16 greedy decoding with HF `generate` (one-token passes, logits kept),
   then one prefill pass over prompt + output. At each position, the gap between the one-token
   pass's two best tokens is measured in both passes; its change, in bf16 steps of the best
   logit, is the noise that a different split of the same sequence adds.
2. Divergences: specframe's plain decoding against two speculative methods; each first
   divergence judged with `specframe.numerics.judge_divergence`.

    python docs/experiments/near_tie_bound.py [PROMPTS] [TOKENS]   # defaults 13 64

Results are in docs/numerics.md.
"""
import sys

import torch

from specframe.bench import load_prompts
from specframe.decoder import SpeculativeDecoder
from specframe.models import load_model
from specframe.numerics import judge_divergence, step

torch.set_num_threads(1)
PROMPTS, TOKENS = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (13, 64)
model, tokenizer = load_model(None, dtype="bf16")
prompts = load_prompts("benchmarks/spec_bench/question.jsonl", None, PROMPTS)
plain = SpeculativeDecoder(model, tokenizer, drafter=None, controller="fixed")
methods = {"early_exit+thompson_cost": SpeculativeDecoder(model, tokenizer),
           "ngram+fixed": SpeculativeDecoder(model, tokenizer, drafter="ngram", controller="fixed")}
moves, divergences = [], {name: [] for name in methods}
for prompt in prompts:
    ids = plain.encode(prompt.text)
    out = model.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    with torch.inference_mode():
        prefill = model(input_ids=out.sequences[:, :-1]).logits[0, len(ids) - 1:].float()  # (T, V)
    for i, one_token in enumerate(out.logits):
        row = one_token[0].float()
        top = torch.topk(row, 2)
        a, b = top.indices.tolist()
        moved = abs(float(row[a] - row[b]) - float(prefill[i, a] - prefill[i, b]))
        moves.append(moved / step(float(top.values[0]), torch.bfloat16))
    expected = plain.generate(ids, max_new_tokens=TOKENS).tokens
    for name, decoder in methods.items():
        verdict = judge_divergence(model, ids, expected, decoder.generate(ids, max_new_tokens=TOKENS).tokens)
        if verdict is not None:
            divergences[name].append(verdict)
            print(f"{prompt.id} {name}: {verdict.describe()}", flush=True)
moves.sort()
n = len(moves)
print(f"\nrounding noise over {n} positions: top-2 gap moved by median {moves[n // 2]:.2f}, "
      f"99th percentile {moves[int(0.99 * (n - 1))]:.2f}, max {moves[-1]:.2f} bf16 steps")
for name, found in divergences.items():
    print(f"{name}: {len(found)} / {len(prompts)} prompts diverge; steps at the first divergence: "
          f"{sorted(round(d.steps, 2) for d in found)}")
