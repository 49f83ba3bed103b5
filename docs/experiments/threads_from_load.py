"""Experiment (issue 17): tokens/s of HF `generate` and of specframe's plain decoding (`none`)
at 1 and 2 threads and, for specframe, the default thread choice from the load
(SPECFRAME_THREADS=auto), in interleaved rounds; fp32 default model, greedy, one prompt.

    python docs/experiments/threads_from_load.py [rounds] [--busy]

--busy keeps one CPU busy with a plain Python loop (nice 0, pinned to the last CPU) for the
run, as another user's job would. Results are in docs/benchmarks.md ("Threads from the load").
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from specframe import SpeculativeDecoder
from specframe.kernels import threads
from specframe.models import load_model

PROMPT = "Explain what a hash table is."
NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rounds", type=int, nargs="?", default=5)
    parser.add_argument("--busy", action="store_true")
    args = parser.parse_args()
    busy = None
    if args.busy:
        last = max(os.sched_getaffinity(0))
        loop = f"import os\nos.sched_setaffinity(0, {{{last}}})\nwhile True: pass"
        busy = subprocess.Popen([sys.executable, "-c", loop])
    try:
        run(args.rounds)
    finally:
        if busy is not None:
            busy.kill()


def run(rounds: int) -> None:
    model, tokenizer = load_model(None, dtype="fp32", device="cpu")
    decoder = SpeculativeDecoder(model, tokenizer, drafter="none")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    default_threads = torch.get_num_threads()
    chosen: list[int] = []
    choose = threads.ThreadChoice.threads
    threads.ThreadChoice.threads = lambda self: chosen.append(choose(self)) or chosen[-1]

    def hf(n: int) -> int:
        torch.set_num_threads(n)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        torch.set_num_threads(default_threads)
        return out.shape[1] - len(ids)

    def specframe(setting: str) -> int:
        os.environ[threads.THREADS_ENV] = setting
        return len(decoder.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0.0).tokens)

    cases = {"hf, 1 thread": lambda: hf(1), f"hf, {default_threads} threads": lambda: hf(default_threads),
             "specframe none, 1 thread": lambda: specframe("1"),
             f"specframe none, {default_threads} threads": lambda: specframe(str(default_threads)),
             "specframe none, auto": lambda: specframe("auto")}
    rates = {name: [] for name in cases}
    for r in range(rounds):
        names = list(cases)
        for name in names[r % len(names):] + names[: r % len(names)]:
            chosen.clear()
            started = time.perf_counter()
            tokens = cases[name]()
            rates[name].append(tokens / (time.perf_counter() - started))
            if name.endswith("auto"):
                print(f"round {r + 1}: auto chose {sorted(set(chosen))} thread(s)", flush=True)
    hf_rate = statistics.median(rates["hf, 1 thread"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name}: {median:.1f} tokens/s (median of {rounds}; {median / hf_rate:.2f} of hf at 1 thread)")


if __name__ == "__main__":
    main()
