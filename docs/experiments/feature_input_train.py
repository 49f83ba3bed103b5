"""Experiment (issue 7 lever): train a head with and without the final-layer feature input.

Step 2 of 2 (see feature_input_prep.py). `base`: the shipped head's design (one decoder layer
on layer-2 states, 8192-token vocabulary, kl+ce). `feat`: the same, whose input is
Linear(2C -> C)([h_t ; g_{t-1-d}]), initialised to pass h_t through, where g is the target's
final feature and d in [0, 4) is how stale it is: within a draft round only the last verified
position's feature is known, so training uses periodic chunks of random length 1-4 per
sequence, as drafting would. Evaluation is teacher-forced, top-1 agreement on held-out answer
positions, with g exactly d + 1 positions back (d = 0: the first draft of a round).

    python docs/experiments/feature_input_train.py MODE THREADS EPOCHS
"""
import sys, time, math, glob, json, torch
from torch import nn
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
from specframe.models import load_model
from specframe.training.dataset import DistillSet
from specframe.training.head import distill_loss, head_targets, reduced_vocabulary
from specframe.heads import EarlyExitHead
MODE = sys.argv[1]  # base | feat
D = 4
model, tok = load_model(dtype="float32", device="cpu")
def load(split):
    paths = sorted(glob.glob(f"/root/.cache/specframe/distill/{split}/shard_*.safetensors"))
    data = DistillSet.from_shards(paths, 2)
    FINAL[id(data)] = torch.load(f"/tmp/feat/{split}.final.pt")  # DistillSet is frozen: keep the feature beside it
    return data
FINAL = {}
train, held = load("train-3b9c942371c0"), load("heldout-3b9c942371c0")
vocab_ids = reduced_vocabulary([train], 8192, [], model.config.vocab_size)
vocab_map = torch.full((model.config.vocab_size,), -1, dtype=torch.long); vocab_map[vocab_ids] = torch.arange(len(vocab_ids))
torch.manual_seed(0)
base = EarlyExitHead(model, 2, 1, vocab_ids).float().train()
C = model.config.hidden_size
class Feat(nn.Module):
    def __init__(self):
        super().__init__(); self.base = base
        self.fc = nn.Linear(2 * C, C, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_(); self.fc.weight[:, :C] = torch.eye(C)
    def forward(self, h, g):
        return self.base.project(self.base.body(self.fc(torch.cat([h, g], -1))))
head = Feat() if MODE == "feat" else None
def collate_g(data, indices, T, d_fixed=None, gen=None):
    B = len(indices); g = torch.zeros(B, T, C)
    for r, i in enumerate(indices):
        s, n = int(data.starts[i]), int(data.sizes[i])
        f = FINAL[id(data)][s:s + n].float()
        t = torch.arange(n)
        if d_fixed is None:
            L = int(torch.randint(1, D + 1, (1,), generator=gen)); off = int(torch.randint(0, L, (1,), generator=gen))
            d = (t - off) % L
        else:
            d = torch.full((n,), d_fixed)
        src = t - 1 - d
        ok = src >= 0
        g[r, :n][ok] = f[src[ok]]
    return g
def run_head(hidden, g):
    return head(hidden, g) if head is not None else base(hidden)
def evaluate(ds):
    res = {}
    mod = head if head is not None else base
    mod.eval()
    with torch.no_grad():
        for d in ([0, 1, 2, 3] if head is not None else [0]):
            hits = cnt = 0
            for indices in held.batches(4096):
                hidden, ids, _, valid, answer, _ = held.collate(indices, "cpu")
                g = collate_g(held, indices, hidden.shape[1], d_fixed=d)
                pred = vocab_ids[run_head(hidden, g).argmax(-1)]
                hits += int(((pred == ids[..., 0]) & answer).sum()); cnt += int(answer.sum())
            res[f"d{d}"] = round(hits / cnt, 4)
    mod.train()
    return res
params = [p for p in (head or base).parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
gen = torch.Generator().manual_seed(0)
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
plan = [b for _ in range(epochs) for b in train.batches(1024, gen)]
total = len(plan); warm = min(100, total // 10 + 1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
t0 = time.time(); sm = None
for step, indices in enumerate(plan, 1):
    hidden, ids, logprobs, valid, answer, weights = train.collate(indices, "cpu")
    ids, logprobs = head_targets(ids, logprobs, vocab_map)
    g = collate_g(train, indices, hidden.shape[1], gen=gen)
    loss = distill_loss(run_head(hidden, g), ids, logprobs, weights, "kl+ce")
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    sm = loss.item() if sm is None else 0.95 * sm + 0.05 * loss.item()
    if step % 50 == 0: print(MODE, step, total, f"loss {sm:.3f} {time.time()-t0:.0f}s", flush=True)
    if step % (total // 3) == 0: print(MODE, "eval", step, evaluate(held), flush=True)
print(MODE, "final", evaluate(held), f"{time.time()-t0:.0f}s", flush=True)
torch.save((head or base).state_dict(), f"/tmp/feat/{MODE}.pt")
