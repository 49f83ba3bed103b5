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

Method specs (comma-separated in --methods):
  hf                      Hugging Face generate, greedy or sampled
  hf-early-exit[:N]       generate(assistant_early_exit=N), default N=4
  hf-prompt-lookup[:N]    generate(prompt_lookup_num_tokens=N), default N=10
  hf-assisted             generate(assistant_model=...), needs --assistant-model PATH
  specframe               plain decoding through specframe's engine (no drafter)
  DRAFTER+CONTROLLER[+VERIFIER], each part NAME[:key=value,...], for example
                          early_exit+thompson, early_exit+fixed:k=3, ngram:max_ngram=4+heuristic
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from attrs import field, frozen

from .errors import ConfigError, SpecframeError

HF_METHODS = {  # name -> default parameter (None: takes none)
    "hf": None,
    "hf-early-exit": 4,  # assistant_early_exit: layers of the target used as its own drafter
    "hf-prompt-lookup": 10,  # prompt_lookup_num_tokens: tokens copied per lookup
    "hf-assisted": None,  # a separate draft model, --assistant-model PATH
}
PLAIN_METHOD = "specframe"
RESULTS_FILE, RUN_FILE = "results.jsonl", "run.json"
# settings a resumed run must share (categories and limit may change: records are per prompt)
RESUME_KEYS = ("model", "dtype", "device", "threads", "dataset", "max_new_tokens", "temperature", "top_k",
               "top_p", "seed", "chat")
WARMUP_TOKENS = 16


# ---- method specs -----------------------------------------------------------------------------
@frozen
class MethodSpec:
    """One method to benchmark, parsed from its spec string."""

    label: str  # canonical spelling, the key in results and tables
    kind: str  # "hf", "hf-early-exit", "hf-prompt-lookup", "hf-assisted" or "specframe"
    hf_param: int | None = None  # N of hf-early-exit / hf-prompt-lookup
    drafter: str | None = None  # None = plain decoding through the engine
    controller: str = "fixed"
    verifier: str = "auto"
    options: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (kind, ((key, value), ...))

    @property
    def is_hf(self) -> bool:
        return self.kind != PLAIN_METHOD

    @property
    def speculative(self) -> bool:
        return self.drafter is not None

    def options_of(self, kind: str) -> dict[str, str]:
        return dict(dict(self.options).get(kind, ()))


def split_methods(text: str) -> list[str]:
    """Split a --methods value on commas, keeping `key=value` pieces with the method before them.

    >>> split_methods("hf,early_exit+fixed:k=3,max_k=8,ngram+heuristic")
    ['hf', 'early_exit+fixed:k=3,max_k=8', 'ngram+heuristic']
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if re.match(r"^[A-Za-z_]\w*=", piece) and "+" not in piece and specs:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def parse_methods(text: str, registry=None) -> list[MethodSpec]:
    """Parse a --methods value; errors name the bad spec and say what is allowed."""
    methods = [parse_method(spec, registry) for spec in split_methods(text)]
    seen: set[str] = set()
    for method in methods:
        if method.label in seen:
            raise ConfigError(f"method {method.label!r} is listed twice in --methods; list each once")
        seen.add(method.label)
    return methods


def parse_method(spec: str, registry=None) -> MethodSpec:
    spec = spec.strip()
    if not spec:
        raise ConfigError("--methods has an empty entry (two commas in a row?); " + _METHODS_HINT)
    head, _, param = spec.partition(":")
    if head in HF_METHODS:
        return _parse_hf(head, param, spec)
    if spec == PLAIN_METHOD:
        return MethodSpec(PLAIN_METHOD, PLAIN_METHOD)
    if spec.startswith("hf") and "+" not in spec:
        raise ConfigError(f"unknown Hugging Face method {spec!r}; choose from {', '.join(HF_METHODS)}")
    pieces = spec.split("+")
    if len(pieces) == 1:
        raise ConfigError(
            f"method {spec!r} names one part; a specframe method is DRAFTER+CONTROLLER[+VERIFIER], for "
            f"example {spec.split(':')[0]}+heuristic (or 'specframe' for plain decoding). " + _METHODS_HINT)
    if len(pieces) > 3:
        raise ConfigError(f"method {spec!r} has {len(pieces)} parts; at most DRAFTER+CONTROLLER+VERIFIER")
    kinds = ("drafter", "controller", "verifier")[: len(pieces)]
    parsed = [_parse_part(piece, kind, spec) for piece, kind in zip(pieces, kinds)]
    names = {kind: name for kind, (name, _) in zip(kinds, parsed)}
    options = tuple((kind, tuple(sorted(opts.items()))) for kind, (_, opts) in zip(kinds, parsed) if opts)
    _validate_parts(names, options, registry)
    label = "+".join(_part_label(name, opts) for name, opts in parsed)
    if len(parsed) == 3 and parsed[2] == ("auto", {}):
        label = label.rsplit("+", 1)[0]
    return MethodSpec(label, PLAIN_METHOD, drafter=names["drafter"], controller=names["controller"],
                      verifier=names.get("verifier", "auto"), options=options)


_METHODS_HINT = ("Methods: hf, hf-early-exit[:N], hf-prompt-lookup[:N], hf-assisted, specframe, "
                 "DRAFTER+CONTROLLER[:key=value,...][+VERIFIER] (see `specframe plugins`).")


def _parse_hf(head: str, param: str, spec: str) -> MethodSpec:
    default = HF_METHODS[head]
    if param and default is None:
        raise ConfigError(f"method {head!r} takes no parameter, got {spec!r}")
    if default is None:
        return MethodSpec(head, head)
    try:
        value = int(param) if param else default
    except ValueError:
        raise ConfigError(f"{head}:N needs a whole number N >= 1, got {param!r} in {spec!r}") from None
    if value < 1:
        raise ConfigError(f"{head}:N needs a whole number N >= 1, got {value} in {spec!r}")
    return MethodSpec(f"{head}:{value}", head, hf_param=value)


def _parse_part(piece: str, kind: str, spec: str) -> tuple[str, dict[str, str]]:
    name, colon, rest = piece.partition(":")
    if not re.fullmatch(r"[A-Za-z_][\w.-]*", name.strip()):
        raise ConfigError(f"{kind} name {name!r} in method {spec!r} is not a name; " + _METHODS_HINT)
    options: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in rest.split(","))) if rest else ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"option {item!r} of {kind} {name!r} in method {spec!r} must be key=value")
        options[key.strip()] = value.strip()
    if colon and not options:
        raise ConfigError(f"{kind} {name!r} in method {spec!r} has ':' but no key=value options")
    return name.strip(), options


def _part_label(name: str, options: dict[str, str]) -> str:
    return name + (":" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) if options else "")


def _validate_parts(names: dict[str, str], options, registry) -> None:
    """Unknown names and unknown or badly typed options fail here, before any model loads."""
    from .plugins import coerce_options, get_registry

    registry = registry or get_registry()
    option_map = dict(options)
    for kind, name in names.items():
        part = registry.get(kind, name)  # UnknownComponentError lists what exists
        coerce_options(part, dict(option_map.get(kind, ())))


# ---- prompts ----------------------------------------------------------------------------------
def load_prompts(dataset: str, categories: list[str] | None = None, limit: int | None = None) -> list:
    """Spec-Bench-format JSONL (first turn of each row), or 'sharegpt' (the held-out split), with
    `limit` taken stratified by category (see `specframe.data.stratified`)."""
    from .data import load_spec_bench, sharegpt_prompts, stratified

    if dataset == "sharegpt":
        if categories:
            raise ConfigError("--categories does not apply to --dataset sharegpt (it has one category)")
        prompts = stratified(sharegpt_prompts("heldout"), limit)
    else:
        prompts = load_spec_bench(dataset, categories, limit)
    if not prompts:
        raise ConfigError(f"--dataset {dataset!r} holds no prompts")
    return prompts


# ---- running one generation ---------------------------------------------------------------------
@frozen
class Outcome:
    """One timed generation."""

    tokens: list[int]
    seconds: float
    finish_reason: str
    stats: dict | None = None  # specframe's GenerationStats as a dict; for HF: rounds and new_tokens


class HFRunner:
    """Hugging Face `generate` with the same EOS set as specframe and a fresh config per call."""

    def __init__(self, model, method: MethodSpec, eos_ids: set[int], assistant=None):
        self.model, self.method, self.eos_ids, self.assistant = model, method, sorted(eos_ids), assistant
        if method.kind == "hf-assisted" and assistant is None:
            raise ConfigError("method 'hf-assisted' needs a draft model: --assistant-model PATH")
        layers = model.config.get_text_config().num_hidden_layers
        if method.kind == "hf-early-exit" and not method.hf_param < layers:
            raise ConfigError(f"{method.label}: N must be below the model's {layers} layers")

    def generate(self, ids: list[int], max_new_tokens: int, sampling: dict, seed: int) -> Outcome:
        import torch

        x = torch.tensor([ids], device=self.model.device)  # (1, T)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0],
                      attention_mask=torch.ones_like(x), **_hf_sampling(sampling))
        if self.method.kind == "hf-early-exit":
            kwargs["assistant_early_exit"] = self.method.hf_param
        elif self.method.kind == "hf-prompt-lookup":
            kwargs["prompt_lookup_num_tokens"] = self.method.hf_param
        elif self.method.kind == "hf-assisted":
            kwargs["assistant_model"] = self.assistant
        torch.manual_seed(seed)
        with restored_generation_state(self.model, self.assistant), counted_target_passes(self.model) as passes:
            started = time.perf_counter()
            out = self.model.generate(x, **kwargs)  # (1, T + new)
            tokens = out[0, len(ids):].tolist()
            seconds = time.perf_counter() - started
        finish = "eos" if tokens and tokens[-1] in self.eos_ids else "length"
        return Outcome(tokens, seconds, finish, {"rounds": passes[0], "new_tokens": len(tokens)})


def _hf_sampling(sampling: dict) -> dict:
    if sampling["temperature"] == 0:
        return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    return {"do_sample": True, "temperature": sampling["temperature"], "top_k": sampling["top_k"],
            "top_p": sampling["top_p"]}


@contextlib.contextmanager
def counted_target_passes(model):
    """Count full forward passes of `model` (prefill included) in a one-item list. Early-exit
    drafting calls the same model with `num_hidden_layers` lowered; those calls are not counted."""
    config, passes = model.config.get_text_config(), [0]
    layers = config.num_hidden_layers

    def count(module, args):
        passes[0] += config.num_hidden_layers == layers

    handle = model.register_forward_pre_hook(count)
    try:
        yield passes
    finally:
        handle.remove()


@contextlib.contextmanager
def restored_generation_state(*models):
    """transformers' assisted generation edits the models' generation_config (the heuristic draft
    length) and, for early exit, `config.num_hidden_layers` without try/finally: undo both, so
    every call starts from the same state and an interrupt cannot leave a truncated model."""
    saved = [(m, copy.deepcopy(m.generation_config), m.config.get_text_config().num_hidden_layers)
             for m in models if m is not None]
    try:
        yield
    finally:
        for model, generation_config, layers in saved:
            model.generation_config = generation_config
            model.config.get_text_config().num_hidden_layers = layers
            inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
            if inner is not None and hasattr(inner, "config"):
                inner.config.get_text_config().num_hidden_layers = layers


class SpecframeRunner:
    """A SpeculativeDecoder on the shared model; times the engine's token stream (no detokenising)."""

    def __init__(self, model, tokenizer, method: MethodSpec, assistant=None):
        from .decoder import SpeculativeDecoder

        drafter_options = method.options_of("drafter")
        if method.drafter == "draft_model" and "model" not in drafter_options and assistant is not None:
            drafter_options["model"] = assistant  # the same weights hf-assisted uses
        self.method = method
        self.decoder = SpeculativeDecoder(
            model, tokenizer, drafter=method.drafter, controller=method.controller, verifier=method.verifier,
            drafter_options=drafter_options, controller_options=method.options_of("controller"),
            verifier_options=method.options_of("verifier"))
        if not self.decoder.lossless:
            print(f"specframe bench: warning: {method.label} uses a lossy verifier; its output may differ "
                  "from plain decoding (the losslessness check will count it)", file=sys.stderr)

    def generate(self, ids: list[int], max_new_tokens: int, sampling: dict, seed: int) -> Outcome:
        started = time.perf_counter()
        stream = self.decoder.stream_tokens(ids, max_new_tokens=max_new_tokens, seed=seed, **sampling)
        tokens: list[int] = []
        try:
            while True:
                tokens += next(stream)
        except StopIteration as stop:
            stats, finish = stop.value
        seconds = time.perf_counter() - started
        record = stats.as_dict()
        record["position_accepts"] = [list(pair) for pair in stats.position_accepts]
        return Outcome(tokens, seconds, finish, record)


def build_runner(method: MethodSpec, model, tokenizer, eos_ids: set[int], assistant=None):
    if method.is_hf:
        return HFRunner(model, method, eos_ids, assistant)
    return SpecframeRunner(model, tokenizer, method, assistant)


# ---- peak memory --------------------------------------------------------------------------------
def reset_peak_memory() -> None:
    """Reset the process's peak RSS (Linux: /proc/self/clear_refs) and CUDA's peak counter."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak RSS (MiB) since the last reset; falls back to the process's lifetime peak."""
    peak = {}
    try:
        status = Path("/proc/self/status").read_text()
        peak["peak_rss_mib"] = round(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024, 1)
    except (OSError, AttributeError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        peak["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20 / 1024, 1)
    import torch

    if torch.cuda.is_available():
        peak["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


# ---- results file -------------------------------------------------------------------------------
class ResultsFile:
    """JSON lines, one per generation, flushed as written. Reading skips a torn last line."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            if handle.tell() and not self.path.read_bytes().endswith(b"\n"):
                handle.write("\n")  # an interrupted write left a torn line: start a fresh one
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def record_key(record: dict) -> tuple[str, str, int]:
    return (str(record["prompt_id"]), record["method"], int(record["repeat"]))


# ---- the command --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `specframe bench`."""
    parser.epilog = __doc__[__doc__.index("Method specs"):]
    data = parser.add_argument_group("prompts")
    data.add_argument("--dataset", required=True, metavar="PATH|sharegpt",
                      help="a Spec-Bench-format JSONL file (e.g. ../shared/data/spec_bench/question.jsonl), "
                           "or 'sharegpt' for the held-out ShareGPT split")
    data.add_argument("--categories", default=None, help="comma-separated categories to keep")
    data.add_argument("--limit", type=int, default=None, help="at most this many prompts, stratified by category")
    methods = parser.add_argument_group("methods")
    methods.add_argument("--methods", default=None,
                         help="comma-separated method specs (see below); default hf,hf-prompt-lookup,specframe "
                              "plus early_exit+thompson_cost (the default EESD) when registered, else ngram+heuristic")
    methods.add_argument("--baseline", default="hf", help="the method speedups are measured against (default hf); "
                         "added to --methods when missing")
    methods.add_argument("--assistant-model", default=None, metavar="PATH",
                         help="draft model for hf-assisted (and for draft_model drafters without model=)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="PATH", help="local HF model directory (default: SmolLM2-135M-Instruct)")
    model.add_argument("--device", default="auto", help="auto, cpu or cuda")
    model.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 (every method uses the same)")
    model.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice, one per core); 1 is steadier on a busy machine")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; checks losslessness)")
    gen.add_argument("--top-k", type=int, default=0, help="top-k filtering when sampling (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (1 = off)")
    gen.add_argument("--seed", type=int, default=0, help="base seed; each (prompt, repeat) gets its own")
    chat = gen.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template to the first turn (default when the tokenizer has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="use the prompt as raw text")
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


def run(args: argparse.Namespace) -> int:
    """`specframe bench`: returns 0, 3 on greedy mismatches with --fail-on-mismatch, 130 if interrupted."""
    _check_arguments(args)
    methods = _resolve_methods(args)
    prompts = _load_prompts(args)
    out = Path(args.out)
    if args.report_only:
        return _report_only(out, args, methods, prompts)
    _set_threads(args)
    results, config = _prepare_out(out, args, methods)
    model, tokenizer, assistant = _load_models(args)
    bench = Bench(args, methods, model, tokenizer, assistant, results)
    ids = bench.encode(prompts)
    interrupted = False
    try:
        bench.warm_up(ids)
        bench.run_all(prompts, ids)
    except KeyboardInterrupt:
        interrupted = True
        print("\nspecframe bench: interrupted; summarising what finished", file=sys.stderr)
    from .bench_report import write_near_ties, write_reports

    if args.temperature == 0:  # numerics: is each greedy mismatch a near-tie? (docs/numerics.md)
        write_near_ties(out, model, ids, results.read(), args.baseline)
    summary = write_reports(out, results.read(), methods, prompts, config, plots=not args.no_plots)
    if interrupted:
        return 130
    mismatches = sum(m.get("mismatches") or 0 for m in summary["methods"].values())
    return 3 if args.fail_on_mismatch and mismatches else 0


def _report_only(out: Path, args, methods: list[MethodSpec], prompts: list) -> int:
    """Summarise what OUT/results.jsonl holds for these prompts and methods, loading no model."""
    from .bench_report import write_reports

    records = ResultsFile(out / RESULTS_FILE).read()
    if not records:
        raise ConfigError(f"--report-only: {out / RESULTS_FILE} holds no results; run the benchmark first "
                          "(without --report-only)")
    try:
        config = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        config = _settings(args)
    write_reports(out, records, methods, prompts, config, plots=not args.no_plots)
    return 0


def _check_arguments(args) -> None:
    for name, low in (("max_new_tokens", 1), ("repeats", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    from .types import SamplingConfig

    SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)  # validates, with clear errors


def _resolve_methods(args) -> list[MethodSpec]:
    from .plugins import get_registry

    registry = get_registry()
    text = args.methods
    if text is None:
        eesd = "early_exit" in registry.names("drafter") and "thompson_cost" in registry.names("controller")
        text = "hf,hf-prompt-lookup,specframe," + ("early_exit+thompson_cost" if eesd else "ngram+heuristic")
    methods = parse_methods(text, registry)
    baseline = parse_method(args.baseline, registry)
    labels = [m.label for m in methods]
    if baseline.label not in labels:
        methods.insert(0, baseline)
    args.baseline = baseline.label
    if any(m.kind == "hf-assisted" for m in methods) and not args.assistant_model:
        raise ConfigError("method 'hf-assisted' needs a draft model: add --assistant-model PATH")
    return methods


def _load_prompts(args) -> list:
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    return load_prompts(args.dataset, categories, args.limit)


def _prepare_out(out: Path, args, methods: list[MethodSpec]) -> tuple[ResultsFile, dict]:
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out / RESULTS_FILE)
    config = _settings(args)
    if results.path.exists() and results.path.stat().st_size:
        if args.overwrite:
            results.path.unlink()
        elif not args.resume:
            raise ConfigError(f"{results.path} already holds results; add --resume to continue that run, "
                              "--overwrite to start again, or choose another --out")
        else:
            _check_resume(out, config)
    config.update(methods=[m.label for m in methods], baseline=args.baseline, repeats=args.repeats,
                  machine=_machine(), versions=_versions(),
                  command="specframe bench " + shlex.join(sys.argv[2 if sys.argv[1:2] == ["bench"] else 1:]))
    (out / RUN_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return results, config


def _settings(args) -> dict:
    """The settings recorded in run.json and compared by --resume (the dataset as an absolute path)."""
    config = {key: getattr(args, key) for key in (*RESUME_KEYS, "categories", "limit")}
    config["dataset"] = args.dataset if args.dataset == "sharegpt" else str(Path(args.dataset).resolve())
    return config


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


def _set_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()  # recorded in run.json


def _load_models(args):
    import torch
    from transformers.utils import logging as hf_logging

    from .models import load_model

    hf_logging.set_verbosity_error()  # generate() warns about assisted-generation settings
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    assistant = None
    if args.assistant_model:
        assistant, _ = load_model(args.assistant_model, device=model.device, dtype=model.dtype)
    return model, tokenizer, assistant


class Bench:
    """Runs every (prompt, method, repeat) not yet in the results file, methods interleaved."""

    def __init__(self, args, methods: list[MethodSpec], model, tokenizer, assistant, results: ResultsFile):
        from .decoder import SpeculativeDecoder, _eos_ids
        from .numerics import dtype_name

        self.args, self.methods, self.results = args, methods, results
        self.sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
        self.encoder = SpeculativeDecoder(model, tokenizer, drafter=None, controller="fixed", verifier="auto")
        self.context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        eos = _eos_ids(tokenizer, model)
        self.runners = {m.label: build_runner(m, model, tokenizer, eos, assistant) for m in methods}
        self.done = {record_key(r) for r in results.read() if not r.get("error")}
        self.dtype = dtype_name(model.dtype)  # numerics: each record names its dtype, so none is compared across

    def encode(self, prompts: list) -> dict[str, list[int]]:
        """Token ids per prompt id (chat template on the first turn, as `specframe run` does)."""
        ids, too_long = {}, []
        for prompt in prompts:
            tokens = self.encoder.encode(prompt.text, self.args.chat)
            if self.context and len(tokens) + self.args.max_new_tokens > self.context:
                too_long.append(prompt.id)
            ids[prompt.id] = tokens
        if too_long:
            print(f"specframe bench: skipping {len(too_long)} prompts longer than the context allows "
                  f"with --max-new-tokens {self.args.max_new_tokens}: {', '.join(too_long[:10])}", file=sys.stderr)
            for prompt_id in too_long:
                del ids[prompt_id]
        return ids

    def warm_up(self, ids: dict[str, list[int]]) -> None:
        """Untimed generations so one-off costs (allocations, lazy init) land in no record."""
        if not ids or not self.args.warmup:
            return
        first = next(iter(ids.values()))
        tokens = min(WARMUP_TOKENS, self.args.max_new_tokens)
        for method in self.methods:
            for _ in range(self.args.warmup):
                try:
                    self.runners[method.label].generate(first, tokens, self.sampling, self.args.seed)
                except SpecframeError as exc:
                    raise SpecframeError(f"method {method.label!r} failed in warm-up: {exc}") from exc

    def run_all(self, prompts: list, ids: dict[str, list[int]]) -> None:
        prompts = _categories_interleaved([p for p in prompts if p.id in ids])
        todo = [(r, i, p, m) for r in range(self.args.repeats) for i, p in enumerate(prompts)
                for m in _rotated(self.methods, i + r) if (p.id, m.label, r) not in self.done]
        bar = _progress(len(todo), self.args.no_progress)
        try:
            for repeat, index, prompt, method in todo:
                bar.set_postfix_str(f"{method.label} · {prompt.category}", refresh=False)
                seed = self.args.seed + 1_000_003 * repeat + index
                self.results.append(self.run_one(prompt, ids[prompt.id], method, repeat, seed))
                bar.update(1)
        finally:
            bar.close()

    def run_one(self, prompt, ids: list[int], method: MethodSpec, repeat: int, seed: int) -> dict:
        record = {"prompt_id": prompt.id, "category": prompt.category, "method": method.label,
                  "repeat": repeat, "seed": seed, "prompt_tokens": len(ids), "dtype": self.dtype}
        reset_peak_memory()
        try:
            outcome = self.runners[method.label].generate(ids, self.args.max_new_tokens, self.sampling, seed)
        except (SpecframeError, RuntimeError, ValueError) as exc:  # recorded, counted, not fatal
            return {**record, "error": f"{type(exc).__name__}: {exc}"}
        return {**record, "new_tokens": len(outcome.tokens), "seconds": round(outcome.seconds, 5),
                "tokens_per_second": round(len(outcome.tokens) / outcome.seconds, 4) if outcome.seconds else 0.0,
                "finish_reason": outcome.finish_reason, **peak_memory(), "stats": outcome.stats,
                "tokens": outcome.tokens}


def _categories_interleaved(prompts: list) -> list:
    """One prompt of each category in turn, so that an interrupted run still covers them all."""
    rank: dict[str, int] = {}
    order = {c: i for i, c in enumerate(dict.fromkeys(p.category for p in prompts))}
    keyed = []
    for prompt in prompts:
        rank[prompt.category] = rank.get(prompt.category, -1) + 1
        keyed.append((rank[prompt.category], order[prompt.category], prompt))
    return [prompt for *_, prompt in sorted(keyed, key=lambda k: k[:2])]


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _progress(total: int, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="gen", desc="bench", disable=disabled, file=sys.stderr, dynamic_ncols=True)
