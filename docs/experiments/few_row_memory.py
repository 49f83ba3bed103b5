"""Experiment (issue 17): resident memory of the default model in fp32 through specframe's
engine, passes over 1-16 new tokens at context 300, against the weights' size.

Prints the process's peak resident memory (ru_maxrss) before loading the model, after
loading it, and after the passes, each over the weights' size. Run it once with the few-row
kernel (the default) and once with SPECFRAME_FEW_ROW_KERNEL=0 (the fallback, which packs a
second copy of the LM head for passes over 2-16 tokens):

    python docs/experiments/few_row_memory.py
    SPECFRAME_FEW_ROW_KERNEL=0 python docs/experiments/few_row_memory.py

Results are in docs/benchmarks.md ("Few-row kernels").
"""
import resource

import torch

from specframe.models import load_model
from specframe.target import TargetModel


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    torch.set_num_threads(1)
    start = peak_mb()
    model, _ = load_model(None, dtype="fp32", device="cpu")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    loaded = peak_mb()
    target = TargetModel(model)
    ids = torch.randint(100, 20000, (316,), generator=torch.Generator().manual_seed(0))
    target.forward(ids[:300], logits_to_keep=1)
    for t in range(1, 17):
        target.forward(ids[300:300 + t])
        target.rollback(300)
    done = peak_mb()
    print(f"path: {target.kernels.path}; weights {weights:.0f} MiB")
    print(f"peak RSS: before loading {start:.0f} MiB, after loading {loaded:.0f} MiB, after the passes {done:.0f} MiB")
    print(f"growth over the weights: loading {(loaded - start) / weights:.2f}x, "
          f"loading and passes {(done - start) / weights:.2f}x; passes alone +{done - loaded:.0f} MiB")


if __name__ == "__main__":
    main()
