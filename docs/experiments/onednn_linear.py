"""Experiment (issues 4 and 7): oneDNN's fp32 matmul with pre-packed weights for the linear layers,
against PyTorch's default (MKL), for a target pass over t = 1, 2, 3, 4, 6, 8 new tokens.

On this AMD CPU, MKL's fp32 GEMM costs nearly twice a matrix-vector product already at two
rows (docs/benchmarks.md). oneDNN (`torch.ops.mkldnn._linear_pointwise` on a weight packed once
by `_reorder_linear_weight`, the path inductor's freezing uses) reads each weight once for a
few rows. Variants, each timed with `specframe.timing.measure` (context 300, 1 thread), in
interleaved rounds:
  - stock:   every linear through F.linear (MKL);
  - onednn:  every linear through oneDNN;
  - hybrid:  MKL for one row (the plain decoding step), oneDNN for 2+ rows (verification);
  - lm_head: like hybrid, but only the LM head (49,152 x 576) goes through oneDNN.
Prints per variant the median over rounds of each size, and the largest logit difference
against stock on a 20-token prompt.

    python docs/experiments/onednn_linear.py [rounds]

Results are in docs/benchmarks.md (oneDNN for verification).
"""
import statistics
import sys

import torch
import torch.nn as nn

from specframe import timing
from specframe.models import load_model

torch.set_num_threads(1)
ops = torch.ops.mkldnn
STOCK = nn.Linear.forward
SIZES = [1, 2, 3, 4, 6, 8]


def onednn(self, x):
    return ops._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def hybrid(self, x):
    if x.numel() == x.shape[-1] or not hasattr(self, "_packed"):
        return STOCK(self, x)
    return onednn(self, x)


def main(rounds: int) -> None:
    model, _ = load_model(None, dtype="float32", device="cpu")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        m._packed = ops._reorder_linear_weight(m.weight.detach(), None)
    variants = {"stock": (STOCK, linears), "onednn": (onednn, linears), "hybrid": (hybrid, linears),
                "lm_head": (hybrid, [model.lm_head])}
    prompt = torch.randint(100, 20000, (1, 20), generator=torch.Generator().manual_seed(0))
    times = {name: {t: [] for t in SIZES} for name in variants}
    diffs = {}
    for r in range(rounds):
        for name, (forward, packed) in variants.items():
            nn.Linear.forward = forward
            _select(linears, packed)
            with torch.inference_mode():
                logits = model(prompt).logits[0]
            if name == "stock":
                reference = logits
            diffs[name] = (logits - reference).abs().max().item()
            ms = timing.measure(model, SIZES, 300, 5)["forward_ms"]
            for t in SIZES:
                times[name][t].append(ms[str(t)])
            print(f"round {r + 1}/{rounds} {name}: " + " ".join(f"{t}:{ms[str(t)]:.1f}" for t in SIZES), flush=True)
    nn.Linear.forward = STOCK
    base = statistics.median(times["stock"][1])
    print("\n| variant | " + " | ".join(f"t = {t}" for t in SIZES) + " | max logit diff |")
    print("| --- |" + " --- |" * (len(SIZES) + 1))
    for name in variants:
        cells = [f"{statistics.median(times[name][t]):.1f} ms ({statistics.median(times[name][t]) / base:.2f})"
                 for t in SIZES]
        print(f"| {name} | " + " | ".join(cells) + f" | {diffs[name]:.1e} |")


def _select(linears, packed) -> None:
    """Give `_packed` only to the layers of this variant (hybrid falls back to MKL without it)."""
    chosen = {id(m) for m in packed}
    for m in linears:
        if "_packed_all" not in m.__dict__:
            m._packed_all = m._packed
        if id(m) in chosen:
            m._packed = m._packed_all
        elif "_packed" in m.__dict__:
            del m._packed


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
