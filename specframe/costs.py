"""Measure what speculation can earn on this machine: forward cost over t tokens, draft step cost.

A verification pass runs the target over k + 1 tokens at once. Speculation pays only if that
costs much less than k + 1 one-token passes. This command times, interleaved and at a fixed
context, one target pass over t new tokens (t = 1, 2, ...) and, when an early-exit head is
available, one EESD draft step, all relative to a one-token pass. From these it prints the
per-token acceptance needed to break even at each draft length k, and the best speedup
possible (every draft accepted). A round is costed as k draft steps plus a full pass over
k + 1 tokens; an early-exit verification reuses the drafts' first N layers, so for EESD this
overstates a round by about N / L of a forward per draft (2 / 30 for the shipped head).

Examples:
  specframe costs                              # default model, shipped head, 1 thread
  specframe costs --threads 2 --context 500
  specframe costs --model ./my-llama --head my-head.safetensors --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from .errors import ConfigError

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments

    parser.epilog = __doc__.split("Examples:", 1)[1].join(["examples:", ""])
    add_model_arguments(parser)
    group = parser.add_argument_group("measurement")
    group.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), metavar="T,T,...",
                       help="numbers of new tokens per pass to time (default 1,2,3,4,6,8; 1 is always added)")
    group.add_argument("--context", type=int, default=300, help="tokens already cached before each pass (default 300)")
    group.add_argument("--repeats", type=int, default=20, help="timed passes per size; the median is kept (default 20)")
    group.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    group.add_argument("--head", default=None, metavar="PATH",
                       help="early-exit head for the draft-step cost (default: the shipped head, if one fits)")
    group.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({1, *(int(part) for part in text.split(",") if part.strip())})
    except ValueError:
        raise ConfigError(f"--sizes must be comma-separated whole numbers such as 1,2,4,8, got {text!r}") from None
    if sizes[0] < 1 or sizes[-1] > 64:
        raise ConfigError(f"--sizes must lie in [1, 64], got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    import torch

    sizes = parse_sizes(args.sizes)
    for name, low in (("context", 1), ("repeats", 3), ("threads", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    from .models import load_model

    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.context + sizes[-1] > _context_limit(model):
        raise ConfigError(f"--context {args.context} plus {sizes[-1]} new tokens exceeds the model's context")
    result = measure(model, sizes, args.context, args.repeats, _head(model, args.head))
    result["settings"] = {"model": args.model or "default", "dtype": str(next(model.parameters()).dtype),
                          "threads": args.threads, "context": args.context, "repeats": args.repeats}
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def _head(model, path: str | None):
    from .heads import EarlyExitHead, shipped_head_path
    from .target import is_layered

    path = path or shipped_head_path(model)
    if path is None or not is_layered(model):
        if path is not None:
            print("specframe costs: this model cannot be split for early exit; draft cost skipped", file=sys.stderr)
        return None
    return EarlyExitHead.from_pretrained(path, model)


def measure(model, sizes: list[int], context: int, repeats: int, head=None) -> dict:
    """Median milliseconds of one pass per size (and of a draft step), timed round-robin."""
    import torch

    from .target import TargetModel

    target = TargetModel(model)
    if head is not None:
        target.enable_split(head.exit_layer)
    generator = torch.Generator().manual_seed(0)
    low = min(100, target.vocab_size // 2)  # skip special tokens at the start of large vocabularies
    ids = torch.randint(low, min(20000, target.vocab_size), (context + max(sizes),), generator=generator)
    target.forward(ids[:context], logits_to_keep=1)
    if head is not None:
        head.reset_cache()
        head.extend(target.hidden_at_split(0, context), logits=False)

    def full(t: int):
        target.forward(ids[context:context + t])
        target.rollback(context)

    def draft():
        head.to_full_vocab(head.extend(target.lower(ids[context:context + 1])))
        target.rollback(context)
        head.rollback(context)

    timers = {t: (lambda t=t: full(t)) for t in sizes}
    if head is not None:
        timers["draft"] = draft
    times = {name: [] for name in timers}
    for name, fn in timers.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in timers.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return summarize(ms, sizes, head.exit_layer if head is not None else None)


def _context_limit(model) -> int:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None) or 10**9


def summarize(ms: dict, sizes: list[int], exit_layer: int | None) -> dict:
    """Relative costs, and for each draft length k the break-even acceptance and the best speedup."""
    one = ms[1]
    relative = {t: ms[t] / one for t in sizes}
    draft = ms["draft"] / one if "draft" in ms else None
    rows = []
    for t in sizes[1:]:
        k = t - 1
        cost = relative[t] + k * (draft or 0.0)
        rows.append({"draft_length": k, "round_cost": round(cost, 3),
                     "best_speedup": round(t / cost, 3),
                     "break_even_acceptance": _break_even(k, cost)})
    return {"forward_ms": {str(t): round(ms[t], 2) for t in sizes},
            "relative": {str(t): round(relative[t], 3) for t in sizes},
            "draft_step_ms": round(ms["draft"], 2) if draft is not None else None,
            "draft_step_over_forward": round(draft, 3) if draft is not None else None,
            "exit_layer": exit_layer, "draft_lengths": rows}


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one round commits with k drafts, each accepted with probability `acceptance`:
    1 + a + … + a^k (the accepted drafts and the target's own token). Also thompson_cost's model."""
    return float(k + 1) if acceptance >= 1.0 else (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def _break_even(k: int, cost: float) -> float | None:
    """Per-token acceptance at which a round of k drafts commits `cost` tokens (None: never)."""
    if expected_tokens(1.0, k) < cost:
        return None
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_tokens(mid, k) < cost else (low, mid)
    return round(high, 3)


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"Target forward pass over t new tokens, context {s['context']}, {s['dtype']}, "
             f"{s['threads']} thread(s), median of {s['repeats']}:", "",
             "| t | ms | relative to t = 1 |", "| --- | --- | --- |"]
    lines += [f"| {t} | {ms:.1f} | {result['relative'][t]:.2f} |" for t, ms in result["forward_ms"].items()]
    if result["draft_step_ms"] is not None:
        lines += ["", f"Early-exit draft step (layers 0..{result['exit_layer'] - 1} + head): "
                      f"{result['draft_step_ms']:.1f} ms = {result['draft_step_over_forward']:.3f} of a forward."]
    lines += ["", "With k drafts per round (verification over k + 1 tokens, plus k draft steps):", "",
              "| k | round cost (forwards) | best speedup (all accepted) | break-even acceptance |",
              "| --- | --- | --- | --- |"]
    for row in result["draft_lengths"]:
        even = "never" if row["break_even_acceptance"] is None else f"{row['break_even_acceptance']:.2f}"
        lines.append(f"| {row['draft_length']} | {row['round_cost']:.2f} | {row['best_speedup']:.2f}× | {even} |")
    return "\n".join(lines)
