"""Experiment (issue 7 lever): final-layer features as a second input of the early-exit head.

Step 1 of 2: the target's last-layer features (after the final norm) for every row of the
distillation shards that `specframe train early-exit` (the command recorded in
specframe/heads/smollm2-135m-instruct-N2.json) wrote under ~/.cache/specframe/distill/.
Writes /tmp/feat/<split>.final.pt. About 7 min on 2 threads for 109 k positions.

    python docs/experiments/feature_input_prep.py
    python docs/experiments/feature_input_train.py base 1 2 & python docs/experiments/feature_input_train.py feat 1 2

Results are in docs/eesd.md (Levers).
"""

import os, sys, time, torch, glob
os.makedirs("/tmp/feat", exist_ok=True)
torch.set_num_threads(2)
from specframe.models import load_model
from specframe.training.dataset import DistillSet
model, tok = load_model(dtype="float32", device="cpu")
for split in ["heldout-3b9c942371c0", "train-3b9c942371c0"]:
    paths = sorted(glob.glob(f"/root/.cache/specframe/distill/{split}/shard_*.safetensors"))
    data = DistillSet.from_shards(paths, 2)
    feats = torch.zeros(data.hidden.shape, dtype=torch.float16)
    started = time.time(); done = 0; maxdiff = 0
    with torch.inference_mode():
        for indices in data.batches(2048):
            T = int(data.sizes[indices].max())
            ids = torch.zeros(len(indices), T, dtype=torch.long); mask = torch.zeros(len(indices), T, dtype=torch.long)
            for r, i in enumerate(indices):
                seq = data.sequence_tokens(i)[:-1]
                ids[r, :len(seq)] = seq; mask[r, :len(seq)] = 1
            out = model(ids, attention_mask=mask, output_hidden_states=True)
            for r, i in enumerate(indices):
                s, n = int(data.starts[i]), int(data.sizes[i])
                feats[s:s+n] = out.hidden_states[-1][r, :n].half()
                maxdiff = max(maxdiff, (out.hidden_states[2][r, :n].half().float() - data.hidden[s:s+n].float()).abs().max().item())
            done += int(data.sizes[indices].sum())
            print(split, done, data.hidden.shape[0], f"{time.time()-started:.0f}s maxdiff_layer2={maxdiff:.3f}", flush=True)
    torch.save(feats, f"/tmp/feat/{split}.final.pt")
