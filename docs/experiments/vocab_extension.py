"""Extend the shipped head's reduced vocabulary without retraining, and measure coverage.

Counts the target's argmax tokens over the cached distillation data (`specframe train` fills
~/.cache/specframe/distill), writes copies of the shipped head whose `vocab_ids` add the next most
frequent tokens (12,288 / 16,384 / 24,576 rows) to OUT, and prints how much of the target's
greedy output in a bench record the shipped 8192 rows cover, per category. Then:

    python docs/experiments/vocab_extension.py DISTILL_DIR OUT docs/bench/xeon-amx-fp32-120/results.jsonl
    python docs/experiments/engine_acceptance.py 12 v8192=specframe/heads/smollm2-135m-instruct-N2-eagle.safetensors v16384=OUT/v16384.safetensors
"""
import collections, glob, json, sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SHIPPED = "specframe/heads/smollm2-135m-instruct-N2-eagle.safetensors"
distill, out, record = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
out.mkdir(parents=True, exist_ok=True)
counts = torch.zeros(49152, dtype=torch.long)
for shard in sorted(glob.glob(f"{distill}/shard_*.safetensors")):
    with safe_open(shard, "pt") as f:
        counts += torch.bincount(f.get_tensor("top_ids")[:, 0].long(), minlength=counts.numel())
tensors = load_file(SHIPPED)
with safe_open(SHIPPED, "pt") as f:
    header = json.loads(f.metadata()["specframe_head"])
base = tensors["vocab_ids"].long()
known = set(base.tolist())
ranked = [t for t in torch.argsort(counts, descending=True).tolist() if t not in known]
print(json.dumps({"rows": base.numel(), "count_coverage": round(counts[base].sum().item() / counts.sum().item(), 4)}))
for size in (12288, 16384, 24576):
    ids = torch.sort(torch.cat([base, torch.tensor(ranked[: size - base.numel()])])).values
    save_file({**tensors, "vocab_ids": ids.to(torch.int32)}, str(out / f"v{size}.safetensors"),
              metadata={"specframe_head": json.dumps({**header, "reduced_vocab": size})})
    print(json.dumps({"rows": size, "count_coverage": round(counts[ids].sum().item() / counts.sum().item(), 4)}))
greedy = collections.defaultdict(lambda: [0, 0])  # category -> [covered, tokens] of the baseline's output
for line in open(record):
    r = json.loads(line)
    if r["method"] == "hf":
        greedy[r["category"]][0] += sum(t in known for t in r["tokens"])
        greedy[r["category"]][1] += len(r["tokens"])
greedy["all"] = [sum(c[0] for c in greedy.values()), sum(c[1] for c in greedy.values())]
print(json.dumps({k: round(c / n, 3) for k, (c, n) in sorted(greedy.items())}))
