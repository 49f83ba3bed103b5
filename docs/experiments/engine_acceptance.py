"""Engine acceptance at fixed k = 1 (fp32, 64 tokens) of heads on N held-out ShareGPT prompts (of
at most 180 tokens) and N Spec-Bench prompts (every len/N-th).

    python docs/experiments/engine_acceptance.py 12 eagle=specframe/heads/smollm2-135m-instruct-N2-eagle.safetensors old=OLD.safetensors
"""
import json, sys, torch
from specframe import SpeculativeDecoder
from specframe.models import load_model
from specframe.data import sharegpt_prompts
torch.set_num_threads(1)
model, tok = load_model()
n = int(sys.argv[1])
held = [p.text for p in sharegpt_prompts("heldout")]
held = [t for t in held if len(tok(t)["input_ids"]) <= 180][:n]
rows = [json.loads(line) for line in open("benchmarks/spec_bench/question.jsonl")]
spec = [r["turns"][0] for r in rows[:: max(1, len(rows) // n)]][:n]
heads = dict(arg.split("=", 1) for arg in sys.argv[2:])  # NAME=HEAD.safetensors ...
for name_of_set, prompts in (("sharegpt_heldout", held), ("spec_bench", spec)):
    for name, path in heads.items():
        acc = drafted = 0
        for text in prompts:
            r = SpeculativeDecoder(model, tok, drafter="early_exit", controller="fixed", controller_options={"k": 1},
                                   drafter_options={"head": path}).generate(text, max_new_tokens=64)
            acc += r.stats.accepted; drafted += r.stats.drafted
        print(json.dumps({"set": name_of_set, "head": name, "accepted": acc, "drafted": drafted,
                          "acceptance": round(acc / max(1, drafted), 3)}), flush=True)
