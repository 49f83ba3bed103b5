"""Building distillation shards on disk, in this process or in single-threaded worker processes.

With `workers` > 1, that many single-threaded processes each build every workers-th shard: on a
small shared CPU this beats one process whose threads wait for each other. A finished shard is
written atomically, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path

from ..errors import SpecframeError
from .shards import (ShardSettings, batches_of_prompts, encode_exchange, encode_prompt, eos_ids_of, generate_shard,
                     teacher_forced_shard)


class DataWorkerError(SpecframeError):
    """A distillation-data worker process failed or died."""


def log(message: str) -> None:
    print(f"specframe train: {message}", file=sys.stderr, flush=True)


def build_distill_data(model_dir, prompts: list, settings: ShardSettings, directory: Path, num_batches: int,
                       workers: int = 1, label: str = "distill") -> list[Path]:
    """Build (or reuse) the first `num_batches` shards in `directory`; return their paths.

    `prompts` are texts, or (prompt, recorded answer) pairs for teacher-forced settings.
    """
    from tqdm import tqdm

    from ..models import load_model

    num_batches = min(num_batches, math.ceil(len(prompts) / settings.batch_size))
    paths = [directory / f"shard_{index:05d}.safetensors" for index in range(num_batches)]
    todo = [i for i, path in enumerate(paths) if not path.exists()]
    if not todo:  # read-only: a data job may be extending the same directory meanwhile
        log(f"{label} data: all {num_batches} shards are cached in {directory}")
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "settings.json").write_text(json.dumps(settings.cache_key(), indent=1))
    _, tokenizer = load_model(model_dir, device="cpu", dtype="fp32")
    encoded: dict[int, object] = {}

    def length_of(index: int) -> int:
        if index not in encoded:
            if settings.teacher_forced:  # (prompt, recorded answer) pairs
                encoded[index] = encode_exchange(tokenizer, *prompts[index], settings.max_prompt_tokens,
                                                 settings.max_answer_tokens)
            else:
                encoded[index] = encode_prompt(tokenizer, prompts[index], settings.max_prompt_tokens)
        item = encoded[index]
        return len(item[0] if settings.teacher_forced else item)

    batches = batches_of_prompts(len(prompts), length_of, settings.batch_size, settings.order_seed, num_batches)
    jobs = [[(i, [encoded[j] for j in batches[i]]) for i in todo[w::workers]] for w in range(workers)]
    bar = tqdm(total=num_batches, initial=num_batches - len(todo), desc=f"{label} data", unit="batch",
               dynamic_ncols=True)
    if workers <= 1:
        build_shards(model_dir, settings, directory, jobs[0], None, bar)
    else:
        run_workers(model_dir, settings, directory, jobs, bar)
    bar.close()
    return paths


def run_workers(model_dir, settings: ShardSettings, directory: Path, jobs: list, bar) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    processes = [context.Process(target=build_shards, args=(model_dir, settings, directory, job, done, None),
                                 kwargs={"threads": 1}, daemon=True) for job in jobs if job]
    for process in processes:
        process.start()
    remaining, started, tokens = sum(len(job) for job in jobs), time.perf_counter(), 0
    try:
        while remaining:
            tokens += next_worker_message(done, processes, directory)
            remaining -= 1
            bar.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - started):.0f}")
            bar.update(1)
    finally:
        for process in processes:
            process.join(timeout=1) if not remaining else process.terminate()


def next_worker_message(done, processes, directory, poll_seconds: float = 5.0) -> int:
    """The next shard's token count from the workers' queue; a clear error if a worker failed or died.

    A worker that dies without reporting (killed, for example by the out-of-memory killer) would
    otherwise leave the wait hanging: between messages, the workers' exit codes are checked.
    """
    import queue

    resume = f"The shards already finished are kept in {directory}, so the same command resumes."
    while True:
        try:
            message = done.get(timeout=poll_seconds)
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise DataWorkerError(f"a distillation-data worker died with exit code {dead[0]} (a negative code "
                                      f"is the signal that killed it, -9 often the out-of-memory killer). {resume}") from None
            continue
        if isinstance(message, str):  # a worker failed and said why
            raise DataWorkerError(f"a distillation-data worker failed: {message}. {resume}")
        return message


def describe_failure(exc: BaseException) -> str:
    """'Type: message (at file:line in function[, called from specframe's file:line in function])'."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = [frames[-1]] if frames else []
    package = str(Path(__file__).resolve().parents[1])
    ours = [f for f in frames if str(Path(f.filename).resolve()).startswith(package)]
    if ours and ours[-1] is not frames[-1]:
        where.append(ours[-1])
    places = ", called from ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in where)
    text = f"{type(exc).__name__}: {str(exc).rstrip('.')}"
    return f"{text} (at {places})" if places else text


def build_shards(model_dir, settings: ShardSettings, directory: Path, job, done, bar, threads: int | None = None) -> None:
    """Worker body: load the model, build each (index, batch) shard, report its answer tokens."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        _build_shards(model_dir, settings, directory, job, done, bar)
    except BaseException as exc:
        if done is None:
            raise
        done.put(describe_failure(exc))


def _build_shards(model_dir, settings: ShardSettings, directory: Path, job, done, bar) -> None:
    from safetensors.torch import save_file

    from ..models import load_model

    model, tokenizer = load_model(model_dir, dtype=settings.dtype)
    eos_ids = eos_ids_of(model, tokenizer)
    started, tokens = time.perf_counter(), 0
    for index, batch in job:
        if settings.teacher_forced:
            sequences, prompt_lengths = zip(*batch)
            shard = teacher_forced_shard(model, list(sequences), list(prompt_lengths), settings)
            answer = int(shard["lengths"].sum())
        else:
            shard = generate_shard(model, tokenizer, batch, settings, eos_ids)
            answer = int(shard["lengths"].sum() - shard["prompt_lengths"].sum())
        path = directory / f"shard_{index:05d}.safetensors"
        partial = path.with_suffix(".partial")
        save_file(shard, str(partial))
        partial.replace(path)
        if done is not None:
            done.put(answer)
        else:
            tokens += answer
            bar.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - started):.0f}")
            bar.update(1)
