"""Experiment (issue 16): where a head training step spends its time, on cached shards.

Loads the cached shards of the command below with `--recorded-answers R` (no data is built:
they must be cached), then times STEPS training steps of KIND split into collation, forward,
loss, backward and optimizer, and prints torch.profiler's top operators.

    python docs/experiments/head_train_profile.py KIND STEPS THREADS [fp32|bf16] [R]
"""
import sys, time, torch
KIND, STEPS, THREADS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
PRECISION = sys.argv[4] if len(sys.argv) > 4 else "fp32"
R = int(sys.argv[5]) if len(sys.argv) > 5 else 160
torch.set_num_threads(THREADS)
from specframe.training.options import training_options
from specframe.training import pipeline
from specframe.training.dataset import DistillSet
from specframe.training.head import batch_loss, reduced_vocabulary, head_vocab_map
from specframe.heads import head_class

options = training_options(layer=2, store_layers=(2,), reduced_vocab=8192, prompts=32, heldout_prompts=32,
                           max_new_tokens=64, recorded_answers=R, dtype="bf16", store_final=True, loss="kl+ce", head_kind=KIND)
model, tok = pipeline.load_target(options)
options = pipeline.resolve(options, model)
paths = pipeline.build_split(model, options, "train")[0] + pipeline.build_split(model, options, "recorded")[0]
train = DistillSet.from_shards(paths, 2)
vocab_ids = reduced_vocabulary([train], 8192, [2], model.config.vocab_size)
config = pipeline.head_training(options)
torch.manual_seed(0)
head = head_class(KIND, "x")(model, 2, 1, vocab_ids).float().train()
vocab_map = head_vocab_map(head, "cpu")
params = [p for p in head.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3)
gen = torch.Generator().manual_seed(0)
plan = train.batches(1024, gen)[:STEPS]
times = dict.fromkeys(("collate+forward+loss", "backward", "optimizer"), 0.0)
seen = 0

def step(indices):
    global seen
    t0 = time.perf_counter()
    loss, positions = batch_loss(head, train, indices, config, vocab_map, gen, PRECISION)
    t1 = time.perf_counter()
    opt.zero_grad(); loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    t3 = time.perf_counter()
    for k, a, b in (("collate+forward+loss", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3)):
        times[k] += b - a
    seen += positions

step(plan[0])
times = dict.fromkeys(times, 0.0); seen = 0
start, cpu = time.perf_counter(), time.process_time()
for indices in plan[1:]:
    step(indices)
total, cpu = time.perf_counter() - start, time.process_time() - cpu
print(f"{KIND} {PRECISION} threads={THREADS}: {seen} positions in {total:.1f} s = {seen / total:.0f} positions/s "
      f"({seen / cpu:.0f} per CPU second: less sensitive to other processes on the cores)")
print({k: round(v / total, 3) for k, v in times.items()})
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for indices in plan[1:4]:
        step(indices)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
