"""Measure what speculation can earn on this machine: forward cost over t tokens, draft step cost.

A verification pass runs the target over k + 1 tokens at once. Speculation pays only if that
costs much less than k + 1 one-token passes. This command times, interleaved and at a fixed
context, one target pass over t new tokens (t = 1, 2, ...) and one step of a drafter (default
the EESD drafter with the shipped head, set up as the engine sets it up), all relative to a
one-token pass. From these it prints the per-token acceptance needed to break even at each
draft length k, and the best speedup possible (every draft accepted). A round is costed as k
draft steps plus a full pass over k + 1 tokens; an early-exit verification reuses the drafts'
first N layers, so for EESD this overstates a round by about N / L of a forward per draft.

Examples:
  specframe costs                              # default model, shipped head, 1 thread
  specframe costs --threads 2 --context 500
  specframe costs --model ./my-llama --head my-head.safetensors --json
  specframe costs --drafter self_exit:layer=6
"""

from __future__ import annotations

import argparse
import json
import sys

from .arguments import add_model_arguments
from .errors import ConfigError, SpecframeError

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("Examples:", 1)[1].join(["examples:", ""])
    add_model_arguments(parser)
    group = parser.add_argument_group("measurement")
    group.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), metavar="T,T,...",
                       help="numbers of new tokens per pass to time (default 1,2,3,4,6,8; 1 is always added)")
    group.add_argument("--context", type=int, default=300, help="tokens already cached before each pass (default 300)")
    group.add_argument("--repeats", type=int, default=20, help="timed passes per size; the median is kept (default 20)")
    group.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    group.add_argument("--drafter", default="early_exit", metavar="NAME[:key=value,...]",
                       help="the drafter whose step is timed (default early_exit; 'none' skips it)")
    group.add_argument("--head", default=None, metavar="PATH",
                       help="early-exit head, short for --drafter early_exit:head=PATH (default: the shipped head)")
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

    from .models import context_length, load_model
    from .timing import measure

    sizes = parse_sizes(args.sizes)
    for name, low in (("context", 1), ("repeats", 3), ("threads", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    drafter_spec = _drafter_spec(args)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    limit = context_length(model.config)
    if limit and args.context + sizes[-1] > limit:
        raise ConfigError(f"--context {args.context} plus {sizes[-1]} new tokens exceeds the model's context of {limit}")
    result = measure(model, sizes, args.context, args.repeats, _drafter(model, drafter_spec))
    result["drafter"] = drafter_spec if result["draft_step_ms"] is not None else None
    result["settings"] = {"model": args.model or "default", "dtype": str(next(model.parameters()).dtype),
                          "threads": args.threads, "context": args.context, "repeats": args.repeats}
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def _drafter_spec(args) -> str | None:
    """The drafter to time as NAME[:key=value,...], checked before the model loads; None for none."""
    from .plugins import coerce_options, get_registry, parse_part

    spec = args.drafter
    if args.head:
        if not spec.startswith("early_exit"):
            raise ConfigError(f"--head applies to the early_exit drafter, not to --drafter {spec!r}")
        spec = f"early_exit:head={args.head}"
    if spec == "none":
        return None
    name, options = parse_part(spec, "drafter", " in --drafter")
    coerce_options(get_registry().get("drafter", name), options)
    return spec


def _drafter(model, spec: str | None):
    """The drafter built from its spec, or None when it cannot run here (said on stderr)."""
    from .plugins import get_registry, parse_part

    if spec is None:
        return None
    name, options = parse_part(spec, "drafter")
    drafter = get_registry().create("drafter", name, options)
    try:
        from .target import TargetModel

        hook = getattr(drafter, "before_prefill", None)
        if hook is not None:
            hook(TargetModel(model), [])  # fails here, clearly, when the drafter cannot run on this model
    except SpecframeError as exc:
        print(f"specframe costs: drafter {spec!r} cannot run here ({exc}); draft cost skipped", file=sys.stderr)
        return None
    return drafter


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"Target forward pass over t new tokens, context {s['context']}, {s['dtype']}, "
             f"{s['threads']} thread(s), median of {s['repeats']}:", "",
             "| t | ms | relative to t = 1 |", "| --- | --- | --- |"]
    lines += [f"| {t} | {ms:.1f} | {result['relative'][t]:.2f} |" for t, ms in result["forward_ms"].items()]
    if result["draft_step_ms"] is not None:
        lines += ["", f"Draft step of {result.get('drafter') or 'the drafter'}: "
                      f"{result['draft_step_ms']:.1f} ms = {result['draft_step_over_forward']:.3f} of a forward."]
    lines += ["", "With k drafts per round (verification over k + 1 tokens, plus k draft steps):", "",
              "| k | round cost (forwards) | best speedup (all accepted) | break-even acceptance |",
              "| --- | --- | --- | --- |"]
    for row in result["draft_lengths"]:
        even = "never" if row["break_even_acceptance"] is None else f"{row['break_even_acceptance']:.2f}"
        lines.append(f"| {row['draft_length']} | {row['round_cost']:.2f} | {row['best_speedup']:.2f}× | {even} |")
    return "\n".join(lines)
