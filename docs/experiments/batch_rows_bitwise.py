"""Experiment (issue 14): is a pass over 5 tokens row for row equal to 5 one-token passes?

For fp32 and bf16, the default model prefills a prompt, then computes the last 5 tokens' logits
once in one pass and once in 5 one-token passes (after a rollback), through the engine's
TargetModel, and prints whether each row is bitwise equal and the largest difference.

    python docs/experiments/batch_rows_bitwise.py

Results are in docs/numerics.md.
"""
import torch
from specframe.models import load_model
from specframe.target import TargetModel
torch.set_num_threads(1)
for dtype in ("fp32", "bf16"):
    model, tok = load_model(None, dtype=dtype)
    t = TargetModel(model)
    ids = torch.tensor(tok("Explain what a hash table is. A hash table is a data structure that")["input_ids"])
    prompt, new = ids[:-5], ids[-5:]
    t.forward(prompt, logits_to_keep=1)
    block = t.forward(new).float()
    t.rollback(len(prompt))
    single = torch.cat([t.forward(new[i:i + 1]) for i in range(5)]).float()
    d = (block - single).abs()
    print(dtype, "rows bitwise equal:", [bool(torch.equal(block[i], single[i])) for i in range(5)],
          "max |diff|", float(d.max()), "max |logit|", float(single.abs().max()))
