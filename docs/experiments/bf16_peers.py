"""Experiment (issue 4): do Hugging Face's own speculative methods match HF greedy in bf16?

EESD departs from plain bf16 greedy decoding on 9 of 13 prompts (docs/benchmarks.md, bf16).
This runs HF generate's prompt lookup and early exit (assistant_early_exit=4) in bf16 on the
same 13 prompts and compares each with HF generate's recorded plain bf16 tokens
(docs/bench/spec-bench-bf16/results.jsonl), to see whether the divergence is specframe's
or any multi-token verification's in bf16.

    python docs/experiments/bf16_peers.py

Results are in docs/benchmarks.md (bf16).
"""
import json, torch
from specframe.models import load_model
from specframe.bench import load_prompts, parse_method
from specframe.bench_runners import build_runner
from specframe.bench_report import first_difference
from specframe.decoder import SpeculativeDecoder
from specframe.models import eos_token_ids
from specframe.plugins import get_registry
torch.set_num_threads(1)
recs = [json.loads(l) for l in open('docs/bench/spec-bench-bf16/results.jsonl') if l.strip()]
hf = {r['prompt_id']: r['tokens'] for r in recs if r['method'] == 'hf'}
model, tok = load_model(None, dtype="bf16")
enc = SpeculativeDecoder(model, tok, drafter="none", controller="fixed")
eos = eos_token_ids(tok, model)
sampling = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
for spec in ("hf-prompt-lookup", "hf-early-exit"):
    runner = build_runner(parse_method(spec, get_registry()), model, tok, eos)
    differs = []
    for p in load_prompts('benchmarks/spec_bench/question.jsonl', None, 13):
        a, b = hf[p.id], runner.generate(enc.encode(p.text, None), 128, sampling, 0).tokens
        i = first_difference(a, b)
        if i is not None:
            differs.append(f"{p.id}@{i}")
    print(f"{spec} (bf16) differs from HF greedy (bf16) on {len(differs)}/13 prompts: {' '.join(differs)}", flush=True)
