"""The torch thread count while generating on CPU (SPECFRAME_THREADS)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator

import torch

THREADS_ENV = "SPECFRAME_THREADS"  # torch threads while generating on CPU: unset = 1, N, or "torch"


def generation_threads(steps: Generator, device) -> Generator:
    """Run a generation's steps with torch's CPU threads at `threads_for_generation()`, and give
    the caller back its own setting between steps (while it consumes a token) and after.

    Why one thread by default: each multi-threaded operator is an OpenMP parallel region whose
    end waits for every thread. When another process keeps a core busy, the thread on that core
    runs only when the scheduler lets it, and every region waits for it (measured in
    docs/benchmarks.md, "Few-row kernels"). A decoding
    round is many short regions, so the cost grows with their number, not with the work. A small
    model's pass is bound by memory bandwidth, which a second thread barely raises, and the
    few-row kernel runs on one thread.
    """
    threads = threads_for_generation(device)
    try:
        while True:
            with _torch_threads(threads):
                try:
                    item = next(steps)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        with _torch_threads(threads):
            steps.close()  # the engine's own cleanup, when the caller stops early


def threads_for_generation(device) -> int | None:
    """Threads for generating on `device`: 1 on CPU, or SPECFRAME_THREADS (N, or "torch" for
    torch's own setting); None leaves the setting alone."""
    from ..errors import ConfigError

    value = os.environ.get(THREADS_ENV, "1").strip().lower()
    if torch.device(device).type != "cpu" or value == "torch":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{THREADS_ENV} must be a whole number >= 1 or 'torch', got {value!r}")
    return int(value)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
