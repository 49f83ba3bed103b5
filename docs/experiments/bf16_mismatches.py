"""Experiment (issue 4): where EESD's greedy output departs from plain decoding in bf16, and why.

Reads docs/bench/spec-bench-bf16/results.jsonl (written by the bf16 command in
docs/benchmarks.md), finds for each prompt the first token where `early_exit+thompson_cost`
differs from `hf`, recomputes the logits at that position in bf16 with one pass over prompt +
the shared prefix, and prints both tokens' logits and the top-2 gap.

    python docs/experiments/bf16_mismatches.py

Results are in docs/benchmarks.md (bf16).
"""
import json, torch
from specframe.models import load_model
from specframe.target import TargetModel
from specframe.bench import load_prompts
from specframe.decoder import SpeculativeDecoder
torch.set_num_threads(1)
recs = [json.loads(l) for l in open('docs/bench/spec-bench-bf16/results.jsonl') if l.strip()]
by = {}
for r in recs: by.setdefault(r['prompt_id'], {})[r['method']] = r
model, tok = load_model(None, dtype="bf16")
enc = SpeculativeDecoder(model, tok, drafter="none", controller="fixed", verifier="auto")
prompts = {p.id: p for p in load_prompts('benchmarks/spec_bench/question.jsonl', None, 13)}
t = TargetModel(model)
for pid, m in by.items():
    a, b = m['hf']['tokens'], m['early_exit+thompson_cost']['tokens']
    i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), None)
    if i is None: continue
    ids = enc.encode(prompts[pid].text, None)
    t.reset()
    logits = t.forward(torch.tensor(ids + a[:i]), logits_to_keep=1)[0].float()
    top = torch.topk(logits, 2)
    print(f"{pid}: first diff at {i}: hf {a[i]} ({logits[a[i]]:.3f}) eesd {b[i]} ({logits[b[i]]:.3f}); plain top-2 gap {float(top.values[0]-top.values[1]):.4f}", flush=True)
