"""The `specframe` command line: run, plugins, train, bench, costs."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings

from . import __version__
from .arguments import add_generation_arguments, add_model_arguments
from .decoder import DEFAULT_CONTROLLER, DEFAULT_DRAFTER, DEFAULT_VERIFIER, PLAIN
from .engine import ON_ERROR_CHOICES
from .errors import ConfigError, SpecframeError

RUN_EXAMPLES = """\
examples:
  specframe run "Explain what a hash table is."
  echo "Write a haiku about the sea." | specframe run
  specframe run --drafter ngram --controller heuristic "Summarise: ..."
  specframe run --drafter self_exit --drafter-opt layer=6 --controller fixed --controller-opt k=3 "Hi"
  specframe run --drafter none "Hi"              # plain decoding through the same engine
  specframe run --temperature 0.8 --top-p 0.95 --seed 1 "Tell me a story."
  specframe run --model ./my-hf-model --no-chat "Once upon a time"
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except SpecframeError as exc:
        print(f"specframe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nspecframe: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specframe",
        description="Lossless speculative decoding with pluggable drafters, controllers and verifiers.",
    )
    parser.add_argument("--version", action="version", version=f"specframe {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_run(commands)
    _add_plugins(commands)
    _add_lazy(commands, "train", "specframe.training", "train an early-exit draft head by self-distillation")
    _add_lazy(commands, "bench", "specframe.bench", "compare methods on a prompt set (speed and losslessness)")
    _add_lazy(commands, "costs", "specframe.costs",
              "time forward passes over t tokens and the draft step: what speculation can earn here")
    return parser


# ---- run ------------------------------------------------------------------------------------
def _add_run(commands) -> None:
    run = commands.add_parser(
        "run", help="generate an answer to a prompt, streamed, with statistics",
        description="Generate with speculative decoding. The output is exactly what plain decoding "
        "would give (greedy), or follows exactly its distribution (sampling). Statistics go to stderr.",
        epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted or '-'")
    add_model_arguments(run)
    strategy = run.add_argument_group("strategy (see `specframe plugins` for every name)")
    strategy.add_argument("--drafter", default=DEFAULT_DRAFTER,
                          help=f"who proposes tokens (default {DEFAULT_DRAFTER}; '{PLAIN}' = plain decoding)")
    strategy.add_argument("--controller", default=DEFAULT_CONTROLLER, help=f"how many to draft (default {DEFAULT_CONTROLLER})")
    strategy.add_argument("--verifier", default=DEFAULT_VERIFIER,
                          help="greedy, speculative or auto (default: greedy at temperature 0, else speculative)")
    for kind in ("drafter", "controller", "verifier"):
        strategy.add_argument(f"--{kind}-opt", action="append", default=[], metavar="KEY=VALUE",
                              help=f"an option of the {kind}, repeatable (e.g. --drafter-opt layer=6)")
    strategy.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="fail",
                          help="when a plugin breaks its contract: fail, or finish with plain decoding (with a warning)")
    add_sampling_arguments(run)
    output = run.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object (text and statistics) instead")
    output.add_argument("--quiet", action="store_true", help="do not print statistics")
    run.set_defaults(handler=cmd_run)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = add_generation_arguments(parser)
    group.add_argument("--truncate-prompt", action="store_true",
                       help="when the prompt plus --max-new-tokens exceeds the model's context, keep the end of "
                            "the prompt (default: stop with an error)")


def parse_options(pairs: list[str], kind: str) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--{kind}-opt expects KEY=VALUE, got {pair!r} (for example --{kind}-opt k=4)")
        options[key.strip()] = value.strip()
    return options


def _read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ConfigError('no prompt given; pass it as an argument (specframe run "...") or on stdin')
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"the prompt on stdin is not valid text in the locale's encoding ({exc}); "
                              "send UTF-8 text or pass the prompt as an argument") from None
    return prompt


def cmd_run(args) -> int:
    from .decoder import SpeculativeDecoder

    prompt = _read_prompt(args.prompt)
    _check_before_loading(args)
    controller_options = parse_options(args.controller_opt, "controller")
    if args.seed is not None and "seed" in _option_names("controller", args.controller):
        controller_options.setdefault("seed", str(args.seed))
    decoder = SpeculativeDecoder.from_pretrained(
        args.model, device=args.device, dtype=args.dtype,
        drafter=args.drafter, controller=args.controller, verifier=args.verifier,
        drafter_options=parse_options(args.drafter_opt, "drafter"),
        controller_options=controller_options,
        verifier_options=parse_options(args.verifier_opt, "verifier"), on_error=args.on_error,
    )
    if not decoder.lossless:
        print(f"specframe: warning: verifier {args.verifier!r} is lossy; the output may differ from plain decoding",
              file=sys.stderr)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, chat=args.chat, truncate=args.truncate_prompt)
    interrupted = False
    with warnings.catch_warnings():
        warnings.simplefilter("always", RuntimeWarning)
        warnings.showwarning = _show_warning
        try:
            for piece in decoder.stream(prompt, **kwargs):
                if not args.json:
                    print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C: keep what was generated and say how far it got
            interrupted = True
        except SpecframeError:
            if not args.json and decoder.last_result is not None and decoder.last_result.tokens:
                print(flush=True)  # end the partial line before the error message
            raise
    result = decoder.last_result
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
                          "drafter": args.drafter, "controller": args.controller, "verifier": args.verifier,
                          "stats": result.stats.as_dict()}))
    else:
        print()
        if not args.quiet:
            print(format_stats(result, args), file=sys.stderr)
    if interrupted:
        print(f"specframe: interrupted after {len(result.tokens)} new tokens", file=sys.stderr)
        return 130
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"specframe: warning: {message}", file=sys.stderr, flush=True)


def _check_before_loading(args) -> None:
    """Fail on bad names, options and sampling values before spending time on loading the model."""
    from .decoder import check_max_new_tokens, sampling_config
    from .plugins import coerce_options, get_registry

    sampling_config(args.temperature, args.top_k, args.top_p, args.seed)
    check_max_new_tokens(args.max_new_tokens)
    registry = get_registry()
    for kind in ("drafter", "controller", "verifier"):
        name = getattr(args, kind)
        if kind == "drafter" and name == PLAIN:
            continue
        coerce_options(registry.get(kind, name), parse_options(getattr(args, f"{kind}_opt"), kind))


def _option_names(kind: str, name: str) -> set[str]:
    import attrs

    from .plugins import get_registry

    factory = get_registry().get(kind, name).factory
    return {f.name for f in attrs.fields(factory)} if attrs.has(factory) else set()


def format_stats(result, args) -> str:
    s = result.stats
    strategy = "plain decoding" if args.drafter == PLAIN else f"{args.drafter} + {args.controller}"
    lines = [
        f"--- {strategy} | {_numerics(args)} | {s.new_tokens} tokens in {s.total_seconds:.2f}s = "
        f"{s.tokens_per_second:.1f} tokens/s | finish: {result.finish_reason}",
    ]
    if args.drafter != PLAIN:
        lines.append(
            f"--- acceptance {s.acceptance_rate:.1%} ({s.accepted}/{s.drafted} drafts) | mean accepted length "
            f"{s.mean_accepted_length:.2f} tokens/round over {s.rounds} rounds"
        )
    lines.append(f"--- time: draft {s.draft_seconds:.2f}s, verify {s.verify_seconds:.2f}s, other {s.other_seconds:.2f}s")
    if s.fallback:
        lines.append(f"--- fell back to plain decoding: {s.fallback}")
    return "\n".join(lines)


def _numerics(args) -> str:
    """The dtype and what it guarantees, e.g. "fp32 | greedy: token-exact" (docs/numerics.md)."""
    from .models import resolve_device, resolve_dtype
    from .numerics import dtype_name, exactness
    from .plugins import get_registry

    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    lossless = bool(getattr(get_registry().get("verifier", args.verifier).factory, "lossless", True))
    return f"{dtype_name(dtype)} | {exactness(dtype, args.temperature == 0, lossless)}"


# ---- plugins --------------------------------------------------------------------------------
def _add_plugins(commands) -> None:
    plugins = commands.add_parser("plugins", help="list every registered drafter, controller and verifier",
                                  description="List plugins and the parts they register, with version and status.")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(handler=cmd_plugins)


def cmd_plugins(args) -> int:
    from .plugins import KINDS, get_registry

    registry = get_registry()
    rows = [{"kind": p.kind, "name": p.name, "plugin": p.plugin, "version": p.version, "status": "ok",
             "description": p.description} for p in sorted(registry.parts.values(), key=lambda p: (KINDS.index(p.kind), p.name))]
    for (kind, name), owners in sorted(registry.conflicts.items()):
        rows.append({"kind": kind, "name": name, "plugin": ", ".join(owners), "version": "",
                     "status": "conflict", "description": "registered by more than one plugin"})
    for plugin in registry.plugins.values():
        if plugin.status == "broken":
            rows.append({"kind": "-", "name": "-", "plugin": plugin.name, "version": plugin.version,
                         "status": "broken", "description": plugin.error})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(_table(rows, ["kind", "name", "plugin", "version", "status", "description"]))
    return 0


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    line = lambda r: "  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip()  # noqa: E731
    header = {c: c.upper() for c in columns}
    return "\n".join([line(header)] + [line(r) for r in rows])


# ---- subcommands that live in their own modules ---------------------------------------------
def _add_lazy(commands, name: str, module: str, help_text: str) -> None:
    """Subcommands whose module provides add_arguments(parser) and run(args) -> int."""
    try:
        target = importlib.import_module(module)
        target.add_arguments, target.run  # noqa: B018 - both must exist
    except Exception as exc:  # a half-written or broken module must not break the other commands
        broken = commands.add_parser(name, help=f"{help_text} (unavailable: {exc})")
        broken.set_defaults(handler=lambda args, exc=exc: _unavailable(name, exc))
        return
    sub = commands.add_parser(name, help=help_text, description=(target.__doc__ or help_text).strip().splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    target.add_arguments(sub)
    sub.set_defaults(handler=target.run)


def _unavailable(name: str, exc: Exception) -> int:
    print(f"specframe: error: `specframe {name}` is unavailable: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
