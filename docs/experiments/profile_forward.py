"""Profile one-token target forwards of the default model through specframe's layered path.

    python docs/experiments/profile_forward.py

Prints torch.profiler's operator table for 10 forwards at a context of 300 tokens, 1 thread.
Results are in docs/benchmarks.md (Where the time goes).
"""
import torch, time
torch.set_num_threads(1)
from specframe.models import load_model
from specframe.target import TargetModel
model, tok = load_model(dtype="float32", device="cpu")
t = TargetModel(model)
t.forward(torch.randint(0,40000,(300,)))
for _ in range(3):
    t.forward(torch.randint(0,40000,(1,))); t.rollback(300)
from torch.profiler import profile
with profile() as p:
    for _ in range(10):
        t.forward(torch.randint(0,40000,(1,))); t.rollback(300)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
