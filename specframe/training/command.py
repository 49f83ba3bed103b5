"""`specframe train early-exit`: its flags, the options they make, and the recorded command."""

from __future__ import annotations

import argparse
import shlex
import sys

import attrs

from ..errors import ConfigError, SpecframeError
from .options import HEAD_KINDS, LOSSES, EarlyExitOptions
from .precision import TRAIN_DTYPES


# ---- the parser -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`specframe train` takes a subcommand; the only one today is `early-exit`."""
    from . import __doc__ as description

    commands = parser.add_subparsers(title="what to train", metavar="KIND", dest="train_kind")
    sub = commands.add_parser("early-exit", help="an EESD early-exit draft head, by self-distillation",
                              description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_early_exit_arguments(sub)
    parser.set_defaults(train_kind=None)


def add_early_exit_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `early-exit`; their defaults are EarlyExitOptions' defaults."""
    default = {f.name: f.default for f in attrs.fields(EarlyExitOptions)}

    def add(group, flag: str, help: str, **kwargs) -> None:
        name = flag[2:].replace("-", "_")
        if "action" not in kwargs:
            kwargs.setdefault("type", type(default[name]) if default[name] is not None else int)
        group.add_argument(flag, default=default[name], help=help, **kwargs)

    from ..arguments import add_model_arguments  # --model, --device, --dtype as in run, bench and costs

    add_model_arguments(parser)  # --dtype: the target's and the data's; the head keeps fp32 weights
    output = parser.add_argument_group("output")
    output.add_argument("--evaluate", default=None, metavar="HEAD",
                        help="train nothing: report HEAD's held-out acceptance and draft-step cost")
    output.add_argument("--output", default=None,
                        help="where to write the head (.safetensors; default: the specframe cache's heads/ folder)")
    head = parser.add_argument_group("head")
    add(head, "--head-kind", "early_exit: reads the layer-N state; eagle: also the target's last-layer feature of "
                             "the previous position, predicted by the head itself for later drafts (EAGLE)",
        type=str, choices=HEAD_KINDS)
    add(head, "--layer", "exit layer N in [1, L-1]: the head reads the state after N of the model's L layers "
                         "(default: about L/5, 6 for a 30-layer model)")
    add(head, "--head-layers", "decoder layers in the head (default 1)")
    add(head, "--reduced-vocab", "score only the R most frequent target tokens when drafting (0 = full vocabulary)")
    data = parser.add_argument_group("distillation data (cached on disk, reused by reruns)")
    add(data, "--prompts", "training prompts to answer (first 80%% of ShareGPT)")
    add(data, "--heldout-prompts", "held-out prompts for the acceptance figure")
    add(data, "--max-prompt-tokens", "user-turn tokens kept per prompt")
    add(data, "--max-new-tokens", "answer tokens the target generates")
    add(data, "--gen-batch-size", "prompts per batched generate call")
    add(data, "--teacher-top-k", "target log-probs kept per position")
    add(data, "--store-layers", "layers whose states are stored, so other N need no new data (default: the exit "
                                "layer and those of 2 4 6 8 12 below the model's last layer)", nargs="+")
    add(data, "--recorded-answers", "also train on this many ShareGPT exchanges with their recorded (not "
                                    "target-generated) answers, teacher-forced: the target's own distribution at "
                                    "every position, 3x cheaper per token than generating")
    add(data, "--max-answer-tokens", "recorded-answer tokens kept per exchange")
    add(data, "--recorded-batch-size", "exchanges per teacher-forced pass")
    add(data, "--recorded-weight", "loss weight of the recorded-answer data")
    add(data, "--data-seed", "seed of the prompt order")
    add(data, "--workers", "single-threaded data processes on CPU (ignored on CUDA)")
    add(data, "--data-only", "only build the distillation data", action="store_true")
    add(data, "--store-final", "also store the target's last-layer feature (always with --head-kind eagle), so "
                               "both kinds can train on the same cached data", action="store_true")
    train = parser.add_argument_group("training")
    add(train, "--loss", "KL to the target's top-K distribution, CE to its argmax, or both", choices=LOSSES)
    add(train, "--epochs", "passes over the training data")
    add(train, "--lr", "peak AdamW learning rate (cosine decay, warm-up)")
    add(train, "--tokens-per-batch", "padded positions per step")
    add(train, "--prompt-weight", "loss weight of prompt positions (answers: 1)")
    add(train, "--seed", "seed of the head's training")
    add(train, "--eval-points", "held-out evaluations during training")
    add(train, "--threads", "torch threads (0 = torch's default)")
    add(train, "--train-dtype", "dtype of the head's matmuls while training (bf16: autocast; weights, optimizer "
                                "and loss stay fp32); auto: bf16 where the CPU has AMX or AVX-512 BF16, or on a "
                                "bf16 GPU", type=str, choices=TRAIN_DTYPES)
    add(train, "--checkpoint-minutes", "write a training checkpoint this often (and at each evaluation and on "
                                       "Ctrl-C) next to --output; the same command resumes from it", type=float)
    eagle = parser.add_argument_group("eagle heads")
    add(eagle, "--ce-weight", "loss = smooth L1 regression of the last-layer feature + this x the --loss term")
    add(eagle, "--feature-noise", "uniform noise U(-a, a) on the input features while training")


def options_from(args: argparse.Namespace) -> EarlyExitOptions:
    """The parsed flags as EarlyExitOptions (the one place a Namespace is read)."""
    names = {f.name for f in attrs.fields(EarlyExitOptions)}
    try:
        return EarlyExitOptions(**{k: v for k, v in vars(args).items() if k in names})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad option for `specframe train early-exit`: {exc}") from None


def canonical_command(options: EarlyExitOptions) -> str:
    """The full command with every option spelled out, as stored in the head's metadata."""
    words = ["specframe", "train", "early-exit"]
    for name, value in attrs.asdict(options).items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "train_kind", None) != "early-exit":
        print("specframe: error: say what to train: `specframe train early-exit --help`", file=sys.stderr)
        return 2
    try:
        options = options_from(args)
        from .pipeline import evaluate_head, train_early_exit

        return evaluate_head(options) if options.evaluate else train_early_exit(options)
    except SpecframeError as exc:
        print(f"specframe: error: {exc}", file=sys.stderr)
        return exc.exit_code
