"""Experiment (issue 17): wall time of a one-token pass of the default model (fp32, context 300)
at 1 and 2 torch threads, HF's forward (DynamicCache) against specframe's TargetModel, in
interleaved rounds. Run it while another job keeps a core busy: at 2 threads every OpenMP
parallel region waits for the thread on the busy core.

    python docs/experiments/threads_under_load.py [rounds]

Results are in docs/benchmarks.md ("Few-row kernels", threads under a busy core).
"""
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from specframe.models import load_model
from specframe.target import TargetModel

CONTEXT = 300


def main(rounds: int) -> None:
    model, _ = load_model(None, dtype="fp32", device="cpu")
    ids = torch.randint(100, 20000, (CONTEXT + 1,), generator=torch.Generator().manual_seed(0))
    target = TargetModel(model)
    target.forward(ids[:CONTEXT], logits_to_keep=1)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids[None, :CONTEXT], cache=cache, use_cache=True)

    def hf():
        with torch.inference_mode():
            model(ids[None, CONTEXT:], cache=cache, use_cache=True)
        cache.crop(-1)

    def specframe():
        target.forward(ids[CONTEXT:])
        target.rollback(CONTEXT)

    times = {(name, threads): [] for name in ("hf", "specframe") for threads in (1, 2)}
    for _ in range(rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, run in (("hf", hf), ("specframe", specframe)):
                started = time.perf_counter()
                run()
                times[(name, threads)].append(time.perf_counter() - started)
    for (name, threads), values in times.items():
        print(f"{name}, {threads} thread(s): median {1000 * statistics.median(values):.0f} ms, "
              f"max {1000 * max(values):.0f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
