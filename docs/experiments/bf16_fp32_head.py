"""Experiment (issue 4): does an fp32 final norm + LM head make EESD's bf16 greedy mismatches rare?

In bf16, EESD departed from plain greedy decoding on 9 of 13 prompts, each time at a tie or
near-tie of bf16 logits (docs/experiments/bf16_mismatches.py). bf16 logits keep 8 significant
bits, so at magnitudes of 16-32 they sit on a grid of 0.125-0.25 and ties are common. This
runs the same 13 prompts with the body in bf16 but the final norm and LM head in fp32, for
plain decoding and for `early_exit+thompson_cost`, and counts where the two differ. It also
counts where plain decoding with the fp32 head departs from HF generate's recorded bf16
tokens (docs/bench/spec-bench-bf16/results.jsonl): that is the price of the change.

    python docs/experiments/bf16_fp32_head.py

Results are in docs/benchmarks.md (bf16).
"""
import json, time, torch
from specframe.models import load_model
from specframe.target import TargetModel
from specframe.bench import load_prompts
from specframe.bench_report import first_difference
from specframe.decoder import SpeculativeDecoder
torch.set_num_threads(1)
recs = [json.loads(l) for l in open('docs/bench/spec-bench-bf16/results.jsonl') if l.strip()]
hf = {r['prompt_id']: r['tokens'] for r in recs if r['method'] == 'hf'}
model, tok = load_model(None, dtype="bf16")
head32 = model.lm_head.weight.detach().float()
def logits_fp32(self, hidden):  # norm in fp32 (RMSNorm keeps its input dtype), head in fp32
    return torch.nn.functional.linear(self.model.model.norm(hidden.float()), head32)
TargetModel.logits = logits_fp32
plain = SpeculativeDecoder(model, tok, drafter="none", controller="fixed")
eesd = SpeculativeDecoder(model, tok, drafter="early_exit", controller="thompson_cost")
n_eesd = n_hf = 0
for p in load_prompts('benchmarks/spec_bench/question.jsonl', None, 13):
    ids = plain.encode(p.text, None)
    t0 = time.perf_counter(); a = plain.generate(ids, max_new_tokens=128).tokens; t1 = time.perf_counter()
    b = eesd.generate(ids, max_new_tokens=128).tokens; t2 = time.perf_counter()
    d_eesd, d_hf = first_difference(a, b), first_difference(hf[p.id], a)
    n_eesd += d_eesd is not None; n_hf += d_hf is not None
    print(f"{p.id} {p.category:15s} eesd vs plain: {'same' if d_eesd is None else f'differs at {d_eesd}'}; "
          f"plain vs hf(bf16 head): {'same' if d_hf is None else f'differs at {d_hf}'}; "
          f"plain {len(a)/(t1-t0):.1f} tok/s, eesd {len(b)/(t2-t1):.1f} tok/s", flush=True)
print(f"with an fp32 norm + LM head: EESD differs from plain on {n_eesd}/13 prompts; plain differs from HF bf16 on {n_hf}/13")
