"""The thread count while generating on CPU (SPECFRAME_THREADS): by default, the CPUs other
processes leave idle."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Generator, Iterator

import torch

THREADS_ENV = "SPECFRAME_THREADS"  # threads while generating on CPU: "auto" (unset), N, or "torch"


RECHECK_SECONDS = 0.5  # how often a generation looks at the load again
RECENT_SECONDS = 10.0  # a reading this old still tells the load at the start of a generation
SPARE = 0.2  # a CPU counts as idle when at least 1 - SPARE of it was idle


def generation_threads(steps: Generator, device) -> Generator:
    """Run a generation's steps with torch's CPU threads (and the compiled kernels', which follow
    torch's) at the count `ThreadChoice` makes, and give the caller back its own setting between
    steps (while it consumes a token) and after.

    Why not always torch's own count: each multi-threaded operator (an OpenMP parallel region,
    or a barrier inside the compiled layers) waits for every thread. When another process keeps
    a core busy, the thread on that core runs only when the scheduler lets it, and every region
    waits for it (docs/benchmarks.md, "Few-row kernels"); a decoding round is many short regions.
    So by default a generation uses only the CPUs other processes leave idle (niced ones count as
    busy: measured, they did not yield enough), re-read from /proc/stat as it goes.
    """
    choice = ThreadChoice(device)
    try:
        while True:
            with _torch_threads(choice.threads()):
                try:
                    item = next(steps)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        with _torch_threads(choice.threads()):
            steps.close()  # the engine's own cleanup, when the caller stops early


class ThreadChoice:
    """The thread count of one generation on `device`, from SPECFRAME_THREADS:

    - unset or "auto": the caller's torch setting, lowered to the CPUs idle of other processes'
      work (`threads_from_load`), looked at again every RECHECK_SECONDS; 1 until a reading
      exists (the first RECHECK_SECONDS of a process's first generation, say);
    - N: N threads; "torch": torch's own setting, left alone (as on other devices).
    """

    def __init__(self, device):
        from ..errors import ConfigError

        value = os.environ.get(THREADS_ENV, "auto").strip().lower() or "auto"
        on_cpu = torch.device(device).type == "cpu"
        self._auto, self._fixed = on_cpu and value == "auto", None
        if value not in ("auto", "torch") and (not value.isdigit() or int(value) < 1):
            raise ConfigError(f"{THREADS_ENV} must be a whole number >= 1, 'auto' or 'torch', got {value!r}")
        if on_cpu and value.isdigit():
            self._fixed = int(value)
        self._cap = torch.get_num_threads()
        self._chosen, self._checked = 1, float("-inf")

    def threads(self) -> int | None:
        """Threads for the next step; None leaves torch's setting alone."""
        if not self._auto:
            return self._fixed
        now = time.monotonic()
        if now - self._checked >= RECHECK_SECONDS:
            self._checked = now
            idle = _LOAD.idle_cpus()
            self._chosen = 1 if idle is None else threads_from_load(idle, self._cap)
        return self._chosen


def threads_from_load(idle_cpus: float, cap: int) -> int:
    """Threads to use when `idle_cpus` CPUs are left idle by other processes: one per idle CPU,
    at most `cap`, at least 1."""
    return max(1, min(cap, int(idle_cpus + SPARE)))


class _Load:
    """CPUs left idle by other processes between two readings of /proc/stat (Linux).

    Busy time is user, nice, system, interrupt and steal time, without this process's own CPU
    time. Niced work counts: with only nice 5-19 jobs on the other core, 2 threads gave 7.9
    tokens/s against 17.9 at 1 (docs/benchmarks.md, "Threads from the load").
    """

    def __init__(self):
        self._last: tuple[float, float, float, float] | None = None  # (when, busy, total, own) ticks

    def idle_cpus(self) -> float | None:
        """Idle CPUs since the last reading if it is recent (then a new one is taken), else None."""
        now, before = _reading(), self._last
        self._last = now
        if now is None or before is None or now[0] - before[0] > RECENT_SECONDS or now[2] <= before[2]:
            return None
        cpus = os.cpu_count() or 1
        others = (now[1] - before[1]) - (now[3] - before[3])  # CPU ticks of other processes' work
        return cpus - max(0.0, others) / ((now[2] - before[2]) / cpus)


def _reading() -> tuple[float, float, float, float] | None:
    try:
        with open("/proc/stat") as stat:
            fields = [int(f) for f in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return (time.monotonic(), user + nice + system + irq + softirq + steal, sum(fields),
            (own.user + own.system) * os.sysconf("SC_CLK_TCK"))


_LOAD = _Load()


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
