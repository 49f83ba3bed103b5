"""Compare methods on a prompt set: speed against a baseline, and whether the output is the same.

`specframe bench` runs Hugging Face `generate` (plain, early exit, prompt lookup, assisted) and
any specframe drafter+controller[+verifier] on the same model object, the same prompts and the
same max new tokens. Methods are interleaved prompt by prompt (their order rotates) so that drift
hits all alike, after a warm-up. Each generation is one JSON line in `OUT/results.jsonl`, written
and flushed as it finishes, so an interrupted run keeps what it did and `--resume` skips it.
At the end it writes `OUT/summary.md` (tables), `OUT/summary.json` and PNG plots.

Speedup follows Spec-Bench (Xia et al., Findings of ACL 2024): tokens per second against plain
decoding of the same model, here as the mean of per-prompt ratios with a 95 % t-interval.
At temperature 0 every method's tokens are compared with the baseline's and mismatches counted.

Method specs: see `specframe bench --help` or specframe.bench_methods.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from attrs import evolve, frozen

from .arguments import add_generation_arguments, add_model_arguments
from .bench_methods import (  # noqa: F401 - the bench's API, importable from here
    HF_METHODS, MethodSpec, method_specs_help, parse_method, parse_methods, split_methods,
)
from .bench_run import Bench, ResultsFile, load_prompts, record_key  # noqa: F401
from .bench_runners import HFRunner, Outcome, SpecframeRunner  # noqa: F401
from .decoder import PLAIN
from .errors import ConfigError

RESULTS_FILE, RUN_FILE = "results.jsonl", "run.json"
# settings a resumed run must share (categories and limit may change: records are per prompt)
RESUME_KEYS = ("model", "dtype", "device", "threads", "dataset", "max_new_tokens", "temperature", "top_k",
               "top_p", "seed", "chat")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `specframe bench`."""
    parser.epilog = "method specs (comma-separated in --methods):\n" + method_specs_help()
    data = parser.add_argument_group("prompts")
    data.add_argument("--dataset", required=True, metavar="PATH|sharegpt",
                      help="a Spec-Bench-format JSONL file (e.g. benchmarks/spec_bench/question.jsonl), "
                           "or 'sharegpt' for the held-out ShareGPT split")
    data.add_argument("--categories", default=None, help="comma-separated categories to keep")
    data.add_argument("--limit", type=int, default=None, help="at most this many prompts, stratified by category")
    methods = parser.add_argument_group("methods")
    methods.add_argument("--methods", default=None,
                         help="comma-separated method specs (see below); default hf,hf-prompt-lookup,none "
                              "plus early_exit+thompson_cost (the default EESD) when registered, else ngram+heuristic")
    methods.add_argument("--baseline", default="hf", help="the method speedups are measured against (default hf); "
                         "added to --methods when missing")
    methods.add_argument("--assistant-model", default=None, metavar="PATH",
                         help="draft model for hf-assisted (and for draft_model drafters without model=)")
    model = add_model_arguments(parser)
    model.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice, one per core); 1 is steadier on a busy machine")
    add_generation_arguments(parser, seed_default=0, seed_help="base seed; each (prompt, repeat) gets its own")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--repeats", type=int, default=1, help="times each (prompt, method) runs (default 1)")
    run_group.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per method (default 1)")
    run_group.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default bench-results)")
    resume = run_group.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="keep OUT/results.jsonl and skip finished records")
    resume.add_argument("--overwrite", action="store_true", help="delete OUT/results.jsonl and start again")
    resume.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the summary and plots from OUT/results.jsonl (for example "
                             "after a run was killed, or after several processes wrote to one OUT)")
    run_group.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_group.add_argument("--fail-on-mismatch", action="store_true",
                           help="exit with status 3 when a method's greedy output differs from the baseline's")


@frozen
class BenchConfig:
    """The settings of one `specframe bench` run, read and checked once from the command line."""

    dataset: str
    categories: tuple[str, ...] | None
    limit: int | None
    methods: tuple[MethodSpec, ...]  # the baseline included
    baseline: str  # its label
    assistant_model: str | None
    model: str | None
    device: str
    dtype: str
    threads: int | None  # None: torch's choice (resolved when the run starts)
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    chat: bool | None
    repeats: int
    warmup: int
    out: Path
    resume: bool
    overwrite: bool
    report_only: bool
    plots: bool
    progress: bool
    fail_on_mismatch: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchConfig":
        _check_arguments(args)
        methods, baseline = _resolve_methods(args.methods, args.baseline, args.assistant_model)
        categories = tuple(c.strip() for c in args.categories.split(",") if c.strip()) if args.categories else None
        return cls(
            dataset=args.dataset, categories=categories or None, limit=args.limit, methods=tuple(methods),
            baseline=baseline, assistant_model=args.assistant_model, model=args.model, device=args.device,
            dtype=args.dtype, threads=args.threads, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat,
            repeats=args.repeats, warmup=args.warmup, out=Path(args.out), resume=args.resume,
            overwrite=args.overwrite, report_only=args.report_only, plots=not args.no_plots,
            progress=not args.no_progress, fail_on_mismatch=args.fail_on_mismatch)

    def settings(self) -> dict:
        """What run.json records and --resume compares (the dataset as an absolute path)."""
        settings = {key: getattr(self, key) for key in (*RESUME_KEYS, "limit")}
        settings["categories"] = ",".join(self.categories) if self.categories else None
        settings["dataset"] = self.dataset if self.dataset == "sharegpt" else str(Path(self.dataset).resolve())
        return settings


def run(args: argparse.Namespace) -> int:
    """`specframe bench`: returns 0, 3 on greedy mismatches with --fail-on-mismatch, 130 if interrupted."""
    config = BenchConfig.from_args(args)
    prompts = load_prompts(config.dataset, list(config.categories or ()) or None, config.limit)
    if config.report_only:
        return _report_only(config, prompts)
    config = evolve(config, threads=_set_threads(config.threads))
    results, settings = _prepare_out(config)
    model, tokenizer, assistant = _load_models(config)
    bench = Bench(config, model, tokenizer, assistant, results)
    ids = bench.encode(prompts)
    interrupted = False
    try:
        bench.warm_up(ids)
        bench.run_all(prompts, ids)
    except KeyboardInterrupt:
        interrupted = True
        print("\nspecframe bench: interrupted; summarising what finished", file=sys.stderr)
    from .bench_report import write_near_ties, write_reports

    if config.temperature == 0:  # numerics: is each greedy mismatch a near-tie? (docs/numerics.md)
        write_near_ties(config.out, model, ids, results.read(), config.baseline)
    summary = write_reports(config.out, results.read(), list(config.methods), prompts, settings, plots=config.plots)
    if interrupted:
        return 130
    mismatches = sum(m.get("mismatches") or 0 for m in summary["methods"].values())
    return 3 if config.fail_on_mismatch and mismatches else 0


def _report_only(config: BenchConfig, prompts: list) -> int:
    """Summarise what OUT/results.jsonl holds for these prompts and methods, loading no model."""
    from .bench_report import write_reports

    records = ResultsFile(config.out / RESULTS_FILE).read()
    if not records:
        raise ConfigError(f"--report-only: {config.out / RESULTS_FILE} holds no results; run the benchmark first "
                          "(without --report-only)")
    try:
        settings = json.loads((config.out / RUN_FILE).read_text())
    except (OSError, ValueError):
        settings = config.settings()
    write_reports(config.out, records, list(config.methods), prompts, settings, plots=config.plots)
    return 0


def _check_arguments(args) -> None:
    for name, low in (("max_new_tokens", 1), ("repeats", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    from .types import SamplingConfig

    SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)  # validates, with clear errors


def _resolve_methods(text: str | None, baseline_spec: str, assistant_model: str | None) -> tuple[list, str]:
    """The methods to run (the baseline first when it was not listed) and the baseline's label."""
    from .plugins import get_registry

    registry = get_registry()
    if text is None:
        eesd = "early_exit" in registry.names("drafter") and "thompson_cost" in registry.names("controller")
        text = f"hf,hf-prompt-lookup,{PLAIN}," + ("early_exit+thompson_cost" if eesd else "ngram+heuristic")
    methods = parse_methods(text, registry)
    baseline = parse_method(baseline_spec, registry)
    if baseline.label not in [m.label for m in methods]:
        methods.insert(0, baseline)
    if any(m.kind == "hf-assisted" for m in methods) and not assistant_model:
        raise ConfigError("method 'hf-assisted' needs a draft model: add --assistant-model PATH")
    return methods, baseline.label


def _prepare_out(config: BenchConfig) -> tuple[ResultsFile, dict]:
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out / RESULTS_FILE)
    settings = config.settings()
    if results.path.exists() and results.path.stat().st_size:
        if config.overwrite:
            results.path.unlink()
        elif not config.resume:
            raise ConfigError(f"{results.path} already holds results; add --resume to continue that run, "
                              "--overwrite to start again, or choose another --out")
        else:
            _check_resume(out, settings)
    settings.update(methods=[m.label for m in config.methods], baseline=config.baseline, repeats=config.repeats,
                    machine=_machine(), versions=_versions(),
                    command="specframe bench " + shlex.join(sys.argv[2 if sys.argv[1:2] == ["bench"] else 1:]))
    (out / RUN_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return results, settings


def _machine() -> str:
    """CPU model and core count (and GPU name), for the report."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    machine = f"{cpu}, {os.cpu_count()} CPUs"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    return machine


def _versions() -> str:
    import torch
    import transformers

    return f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}"


def _check_resume(out: Path, config: dict) -> None:
    try:
        before = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return
    changed = [f"{k}: {before.get(k)!r} -> {config[k]!r}" for k in RESUME_KEYS if k in before and before[k] != config[k]]
    if changed:
        raise ConfigError(f"--resume with settings that differ from the first run in {out} "
                          f"({'; '.join(changed)}); use the same settings or another --out")


def _set_threads(threads: int | None) -> int:
    """Set torch's CPU threads when asked; return the number in use (recorded in run.json).

    specframe's methods then generate with the same number as HF `generate` (its own default
    follows the load while generating, specframe.kernels.threads), so the comparison is fair.
    """
    import os

    import torch

    from .kernels import THREADS_ENV

    if threads:
        torch.set_num_threads(threads)
    os.environ[THREADS_ENV] = str(torch.get_num_threads())
    return torch.get_num_threads()


def _load_models(config: BenchConfig):
    from transformers.utils import logging as hf_logging

    from .models import load_model

    hf_logging.set_verbosity_error()  # generate() warns about assisted-generation settings
    model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
    assistant = None
    if config.assistant_model:
        assistant, _ = load_model(config.assistant_model, device=model.device, dtype=model.dtype)
    return model, tokenizer, assistant
