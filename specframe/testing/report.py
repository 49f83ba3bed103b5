"""What the kit reports: one result per checked property, gathered in a report that raises
`ConformanceError` (an AssertionError naming the part, its plugin and each broken property)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from attrs import frozen

from ..errors import PluginContractError


@frozen
class CheckResult:
    """One property of one part: passed, failed or skipped, and why."""

    check: str  # short id, e.g. "q_sampling"
    prop: str  # the property in words
    status: str  # "passed", "failed" or "skipped"
    detail: str = ""
    seconds: float = 0.0


@frozen
class ConformanceReport:
    """Every check run against one part."""

    kind: str
    name: str
    plugin: str
    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        failed = self.failures
        head = (f"{self.kind} {self.name!r} (plugin {self.plugin!r}) "
                + (f"failed {len(failed)} of {len(self.results)} conformance checks:" if failed
                   else f"passed {sum(r.status == 'passed' for r in self.results)} conformance checks"))
        lines = [head] + [f"  - {r.prop} [{r.check}]: {r.detail}" for r in failed]
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [f"{r.status:7}  {r.check:14} {r.seconds:6.2f}s  {r.prop}" + (f": {r.detail}" if r.detail else "")
                for r in self.results]
        return "\n".join([f"{self.kind} {self.name!r} (plugin {self.plugin!r})", *rows])

    def raise_for_failures(self) -> "ConformanceReport":
        if self.failures:
            raise ConformanceError(self)
        return self


class ConformanceError(AssertionError):
    """A part failed the conformance kit; the message names it, its plugin and each broken property."""

    def __init__(self, report: ConformanceReport):
        self.report = report
        self.plugin, self.name, self.kind = report.plugin, report.name, report.kind
        self.properties = [r.prop for r in report.failures]
        super().__init__(report.summary())


class CheckFailed(AssertionError):
    """Raised inside a check: the property does not hold (the message says how)."""


class CheckSkipped(Exception):
    """Raised inside a check: the check does not apply (the message says why)."""


def run_checks(kind: str, name: str, plugin: str, checks: list[tuple[str, str, Callable[[], str | None]]],
                only: tuple[str, ...] | None) -> ConformanceReport:
    """Run (id, property, function) checks; a function passes by returning, fails by raising."""
    results = []
    for check, prop, function in checks:
        if only is not None and check not in only:
            continue
        started = time.perf_counter()
        try:
            with single_thread():
                note = function()
            status, detail = "passed", note or ""
        except CheckSkipped as skip:
            status, detail = "skipped", str(skip)
        except (CheckFailed, PluginContractError) as exc:
            status, detail = "failed", str(exc)
        except Exception as exc:  # the part crashed: that breaks the property too
            status, detail = "failed", f"raised {type(exc).__name__}: {exc}"
        results.append(CheckResult(check, prop, status, detail, time.perf_counter() - started))
    return ConformanceReport(kind, name, plugin, tuple(results))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Toy models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
