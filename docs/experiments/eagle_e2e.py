"""Greedy equality and engine acceptance of heads on 4 Spec-Bench prompts (64 tokens, --dtype auto).

    python docs/experiments/eagle_e2e.py early_exit=/tmp/eagle_m/early_exit.safetensors eagle=/tmp/eagle_m/eagle.safetensors
"""
import json, sys, torch
from specframe import SpeculativeDecoder
from specframe.models import load_model
torch.set_num_threads(1)
model, tok = load_model()
rows = [json.loads(l) for l in open("benchmarks/spec_bench/question.jsonl")]
prompts = [r["turns"][0] for r in rows[::40]][:4]
heads = dict(arg.split("=", 1) for arg in sys.argv[1:])  # NAME=HEAD.safetensors ...
for k in (1, 3):
    for name, path in heads.items():
        acc = drafted = same = 0
        for text in prompts:
            plain = SpeculativeDecoder(model, tok, drafter=None, controller="fixed").generate(text, max_new_tokens=64).tokens
            r = SpeculativeDecoder(model, tok, drafter="early_exit", controller="fixed", controller_options={"k": k},
                                   drafter_options={"head": path}).generate(text, max_new_tokens=64)
            same += r.tokens == plain; acc += r.stats.accepted; drafted += r.stats.drafted
        print(json.dumps({"k": k, "head": name, "identical": f"{same}/{len(prompts)}", "accepted": acc,
                          "drafted": drafted, "acceptance": round(acc / max(1, drafted), 3)}), flush=True)
