"""Experiment (issue 17): two versions of specframe/kernels/few_rows.c on the default model,
fp32 (or bf16 with --dtype bf16: the sources built with -DSPECFRAME_BF16), 1 thread, context 300: the cost of a target pass over t = 1..16 new tokens, interleaved
in one process, and whether both give bitwise the same logits (chain passes of 1-16 rows, a
prefill, and a token tree).

    git show 145707e:specframe/kernels/few_rows.c > /tmp/main_few_rows.c  # before the wider tiles
    python docs/experiments/kernel_sources_ab.py 21 /tmp/main_few_rows.c specframe/kernels/few_rows.c

Each pass is timed with the thread's CPU time; prints the median and the minimum per source,
relative to that source's one-token pass. Results are in docs/benchmarks.md ("Wider tiles,
folded sums").
"""
import argparse
import statistics
import time

import torch

from specframe.kernels import FewRowKernels, build
from specframe.kernels.layers import CompiledLayers
from specframe.models import load_model
from specframe.target import TargetModel

SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
CONTEXT = 300


def use(target: TargetModel, model, lib) -> None:
    """Route the target's compiled layers and its LM head through `lib`."""
    build.library = lambda dtype=torch.float32: lib
    target.compiled = CompiledLayers(model, lib)
    target.kernels = FewRowKernels(model)  # its routes call build.library() when they run


def logits_of(target: TargetModel, ids: torch.Tensor) -> list[torch.Tensor]:
    got = [target.forward(ids[:13])]
    for t in (1, 2, 3, 5, 7, 8, 9, 12, 16):
        got.append(target.forward(ids[13 : 13 + t]))
        target.rollback(13)
    target.forward(ids[13:CONTEXT], logits_to_keep=1)
    for t in (1, 4, 8, 16):
        got.append(target.forward(ids[CONTEXT : CONTEXT + t]))
        target.rollback(CONTEXT)
    got.append(target.forward_tree(ids[CONTEXT : CONTEXT + 7], (-1, 0, 0, 1, 2, 2)))
    target.rollback(CONTEXT)
    return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rounds", type=int)
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    flags = (*build.CFLAGS, *build.KERNEL_DTYPES[dtype])
    libs = [build.load_library(build.build_library("cc", flags, open(path).read()), dtype) for path in args.sources]
    model, _ = load_model(None, device="cpu", dtype=args.dtype)
    ids = torch.randint(100, 20000, (CONTEXT + 16,), generator=torch.Generator().manual_seed(0))
    targets = [TargetModel(model) for _ in libs]
    logits = []
    for target, lib in zip(targets, libs):
        use(target, model, lib)
        logits.append(logits_of(target, ids))
    for path, got in zip(args.sources[1:], logits[1:]):
        same = all(torch.equal(a, b) for a, b in zip(logits[0], got))
        print(f"{path}: logits bitwise those of {args.sources[0]}: {same}")
    times = {(i, t): [] for i in range(len(libs)) for t in SIZES}
    for _ in range(args.rounds):
        for i, (target, lib) in enumerate(zip(targets, libs)):
            use(target, model, lib)
            for t in SIZES:
                started = time.thread_time()
                target.forward(ids[CONTEXT : CONTEXT + t])
                times[i, t].append(time.thread_time() - started)
                target.rollback(CONTEXT)
    for i, path in enumerate(args.sources):
        for how, pick in (("median", statistics.median), ("min", min)):
            ms = {t: 1000 * pick(times[i, t]) for t in SIZES}
            ratios = " ".join(f"{t}: {ms[t] / ms[1]:.2f}" for t in SIZES[1:])
            print(f"{path} ({how}): t = 1 {ms[1]:.1f} ms; {ratios}")


if __name__ == "__main__":
    main()
