"""Experiment (issues 4 and 7): torch.compile of the target's forward, with frozen weights and
inductor's C++ GEMM template, against eager, for t = 1, 2, 4, 8 new tokens at a context of 300.

Uses transformers' StaticCache (crop(-n) rewinds it) and `torch.compile(model.forward)` with
`freezing` and `max_autotune` (backends CPP, ATen). Prefill stays eager. Prints per size the
best of 8 compiled passes, the best of 5 eager passes on the same cache, the compile time,
and the largest logit difference.

    python docs/experiments/compile_forward.py

Results are in docs/benchmarks.md (torch.compile).
"""
import torch, time, sys
torch.set_num_threads(1)
import torch._inductor.config as cfg
cfg.max_autotune = True
cfg.freezing = True
cfg.max_autotune_gemm_backends = "CPP,ATEN"
from transformers import StaticCache
from specframe.models import load_model
model, tok = load_model(dtype="float32", device="cpu")
model.eval()
MAX = 512
cache = StaticCache(config=model.config, max_cache_len=MAX)
fwd = torch.compile(model.forward, dynamic=False)
torch.manual_seed(0)
prompt = torch.randint(100, 20000, (1, 300))
def crop(n):
    for layer in cache.layers:
        extra = int(layer.get_seq_length()) - n
        if extra > 0: layer.crop(-extra)
with torch.inference_mode():
    ref_logits = None
    model(prompt, cache=cache, use_cache=True)  # eager prefill
    for T in [1, 2, 4, 8]:
        x = torch.randint(100, 20000, (1, T))
        t0 = time.time(); out = fwd(x, cache=cache, use_cache=True); ct = time.time() - t0
        crop(300)
        ts = []
        for _ in range(8):
            s = time.perf_counter(); out = fwd(x, cache=cache, use_cache=True); ts.append(time.perf_counter() - s); crop(300)
        eager_out = model(x, cache=cache, use_cache=True); crop(300)
        te = []
        for _ in range(5):
            s = time.perf_counter(); model(x, cache=cache, use_cache=True); te.append(time.perf_counter() - s); crop(300)
        diff = (out.logits - eager_out.logits).abs().max().item()
        same = bool((out.logits.argmax(-1) == eager_out.logits.argmax(-1)).all())
        print(T, f"compiled {1000*min(ts):.1f}ms eager(static) {1000*min(te):.1f}ms compile {ct:.0f}s maxdiff {diff:.2e} argmax_same {same}", flush=True)
