"""Experiment (issue 17): the default model's target pass over t = 1..16 new tokens at context
300, fp32, 1 thread, with three choices for its linear layers, in interleaved rounds:
  - pytorch:      PyTorch's kernels everywhere (MKL);
  - onednn_head:  PyTorch's, but the LM head of a pass over 2-16 tokens through oneDNN on a
                  packed copy (what specframe did before, and its fallback without a C compiler);
  - kernel_hf_attention: specframe.kernels' compiled few-row kernel for every linear, with
                  transformers' SDPA attention;
  - kernel:       the kernel and specframe.kernels.few_row_attention (the path of models the
                  compiled layers do not cover);
  - compiled_layers: whole decoder layers in one C call per pass (specframe.kernels.layers; the
                  default for Llama models), and the kernel for the LM head.

Each pass is timed with the thread's CPU time (time.thread_time), not the wall clock, so a
busy machine that deschedules this process inflates the figures less; they still share caches
and memory bandwidth with whatever else runs. Prints the median per variant and size, relative
to the median one-token pass of `pytorch`, the peak resident memory over the weights' size, and
the largest logit difference against `pytorch` on the t = 8 pass.

    python docs/experiments/few_row_kernels.py [rounds] [--dtype fp32|bf16]

Results are in docs/benchmarks.md ("Few-row kernels").
"""
import argparse
import resource
import statistics
import time

import torch

from specframe import kernels
from specframe.kernels import build
from specframe.models import load_model
from specframe.target import TargetModel

SIZES = [1, 2, 3, 4, 6, 8, 12, 16]
CONTEXT = 300


def variants(model) -> dict:
    """name -> (FewRowKernels routes, attention config or None, compiled layers or None), built
    once so rounds only switch."""
    library = build.library
    build.library = lambda: None
    try:
        fallback = kernels.FewRowKernels(model)
    finally:
        build.library = library
    chosen = {"pytorch": ([], None, None), "onednn_head": (fallback._routes, None, None)}
    if library() is not None:
        default = kernels.FewRowKernels(model)
        chosen["kernel_hf_attention"] = (default._routes, None, None)
        chosen["kernel"] = (default._routes, default._config, None)
        chosen["compiled_layers"] = (default._routes, default._config, kernels.compiled_layers(model))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rounds", type=int, nargs="?", default=5)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(None, dtype=args.dtype, device="cpu")
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    target = TargetModel(model)
    routes = variants(model)
    ids = torch.randint(100, 20000, (CONTEXT + max(SIZES),), generator=torch.Generator().manual_seed(0))
    target.forward(ids[:CONTEXT], logits_to_keep=1)
    times = {name: {t: [] for t in SIZES} for name in routes}
    logits = {}
    names = list(routes)
    for r in range(args.rounds):
        for t in SIZES:
            for name in names[r % len(names):] + names[:r % len(names)]:  # each variant leads in turn
                target.kernels._routes, target.kernels._config, target.compiled = routes[name]
                started = time.thread_time()
                out = target.forward(ids[CONTEXT:CONTEXT + t])
                times[name][t].append(time.thread_time() - started)
                target.rollback(CONTEXT)
                if t == 8:
                    logits[name] = out
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    base = statistics.median(times["pytorch"][1])
    print(f"\n{args.dtype}, context {CONTEXT}, 1 thread, thread CPU time, median of {args.rounds} rounds; "
          f"weights {weights_mb:.0f} MB, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("\n| variant | " + " | ".join(f"t = {t}" for t in SIZES) + " | max logit diff (t = 8) |")
    print("| --- |" + " --- |" * (len(SIZES) + 1))
    for name in routes:
        cells = []
        for t in SIZES:
            ms = 1000 * statistics.median(times[name][t])
            cells.append(f"{ms:.1f} ms ({ms / 1000 / base:.2f})")
        diff = (logits[name] - logits["pytorch"]).abs().max().item()
        print(f"| {name} | " + " | ".join(cells) + f" | {diff:.1e} |")


if __name__ == "__main__":
    main()
