"""The options of `specframe train early-exit` as one frozen value, and the defaults that derive
from the model: the exit layer, the stored layers and the dtype.

Dtype policy (one place says where each tensor lives):
- the target, and so the distillation data it produces, run in `--dtype` (`auto`: fp32, as for
  generation, `specframe.models.resolve_dtype`; pass `--dtype bf16` for data about twice as
  fast on a CPU or GPU with bf16 units);
- shards store layer states in the dtype they were computed in (fp32 narrowed to fp16, as the
  cached data of the shipped head), teacher ids as int32 and log-probabilities as fp16; a
  `DistillSet` keeps them so in memory and widens one batch at a time (states to fp32);
- the head's trainable weights, their gradients, the optimizer state, the norms and the loss
  are fp32;
- its matmuls and attention run in `--train-dtype` (`training.precision`; `auto`: bf16
  autocast where the device has bf16 units, AMX or AVX-512 BF16 on a CPU, else fp32);
- held-out evaluation runs the fp32 head without autocast, whatever `--train-dtype`;
- the frozen LM head is cast once to the head's dtype (`EarlyExitHead.lm_weight`);
- the saved head is fp16, loaded for drafting in the target's dtype.
"""

from __future__ import annotations

import difflib

import attrs
from attrs import field, frozen
from attrs.validators import ge, in_

from ..errors import ConfigError
from .precision import TRAIN_DTYPES

DEFAULT_EXTRA_LAYERS = (2, 4, 6, 8, 12)  # also stored where the model has them, so other N need no new data
LOSSES = ("kl", "ce", "kl+ce")
HEAD_KINDS = ("early_exit", "eagle")  # eagle: also reads the target's last-layer feature (specframe.eagle_head)
DTYPES = ("auto", "fp32", "bf16", "fp16")
_positive, _non_negative = ge(1), ge(0)


@frozen(kw_only=True)
class EarlyExitOptions:
    """Every flag of `specframe train early-exit`, with '-' written '_'. None = derived from the model."""

    # model and output
    model: str | None = None  # local HF model directory; None = the default model
    device: str = "auto"
    dtype: str = field(default="auto", validator=in_(DTYPES))  # the target's (and the data's) dtype
    evaluate: str | None = None  # a saved head to evaluate instead of training
    output: str | None = None  # where to write the head
    # head
    head_kind: str = field(default="early_exit", validator=in_(HEAD_KINDS))
    layer: int | None = None  # exit layer; None: about L / 5; checked against the model's depth
    head_layers: int = field(default=1, validator=_positive)
    reduced_vocab: int = field(default=8192, validator=_non_negative)
    # distillation data
    prompts: int = field(default=4096, validator=_positive)
    heldout_prompts: int = field(default=128, validator=_positive)
    max_prompt_tokens: int = field(default=192, validator=_positive)
    max_new_tokens: int = field(default=128, validator=_positive)
    gen_batch_size: int = field(default=32, validator=_positive)
    teacher_top_k: int = field(default=32, validator=_positive)
    store_layers: tuple[int, ...] | None = field(default=None, converter=attrs.converters.optional(tuple))
    recorded_answers: int = field(default=0, validator=_non_negative)
    max_answer_tokens: int = field(default=256, validator=_positive)
    recorded_batch_size: int = field(default=16, validator=_positive)
    recorded_weight: float = 1.0
    data_seed: int = 0
    workers: int = field(default=2, validator=_positive)
    data_only: bool = False
    store_final: bool = False  # also store the last-layer feature (always for --head-kind eagle)
    # training
    loss: str = field(default="kl", validator=in_(LOSSES))
    epochs: int = field(default=2, validator=_non_negative)
    lr: float = 3e-3
    tokens_per_batch: int = field(default=1024, validator=_positive)
    prompt_weight: float = 1.0
    seed: int = 0
    eval_points: int = field(default=4, validator=_non_negative)
    # eagle heads only
    ce_weight: float = 1.0  # loss = smooth L1 feature regression + ce_weight x the --loss term
    feature_noise: float = 0.1  # uniform noise U(-a, a) on the input features while training
    threads: int = field(default=0, validator=_non_negative)  # 0 = torch's default
    train_dtype: str = field(default="auto", validator=in_(TRAIN_DTYPES))  # the head's matmuls while training
    checkpoint_minutes: float = field(default=10.0, validator=ge(0))  # training checkpoints; 0: at evaluations only

    def for_model(self, num_layers: int, dtype_name: str) -> "EarlyExitOptions":
        """These options with the exit layer, stored layers and dtype filled in for an L-layer model."""
        layer = default_exit_layer(num_layers) if self.layer is None else self.layer
        check_exit_layer(layer, num_layers, self.head_layers)
        if self.store_layers is None:
            store = stored_layers(layer, num_layers)
        else:
            store = tuple(sorted(set(self.store_layers)))
            bad = [n for n in store if not 1 <= n <= num_layers - 1]
            if bad:
                raise ConfigError(f"--store-layers {' '.join(map(str, bad))}: this model has {num_layers} layers, "
                                  f"so stored layers must be in [1, {num_layers - 1}]")
            if layer not in store:
                raise ConfigError(f"--layer {layer} is not among --store-layers {list(store)}; add it there, "
                                  "or leave --store-layers out to store the exit layer and a few others")
        return attrs.evolve(self, layer=layer, store_layers=store, dtype=dtype_name,
                            store_final=self.store_final or self.head_kind == "eagle")


def default_exit_layer(num_layers: int) -> int:
    """About a fifth of the depth (6 of SmolLM2-135M's 30 layers), at least 1."""
    return max(1, min(num_layers - 1, round(num_layers / 5)))


def stored_layers(exit_layer: int, num_layers: int) -> tuple[int, ...]:
    """The exit layer and those of DEFAULT_EXTRA_LAYERS that this model has below its last layer."""
    return tuple(sorted({exit_layer, *(n for n in DEFAULT_EXTRA_LAYERS if n <= num_layers - 1)}))


def check_exit_layer(layer: int, num_layers: int, head_layers: int = 1) -> None:
    highest = num_layers - head_layers
    if not 1 <= layer <= highest:
        raise ConfigError(f"--layer {layer} is impossible: this model has {num_layers} layers, so with a "
                          f"{head_layers}-layer head the exit layer must be in [1, {highest}]")


class UnknownTrainingOptionError(ConfigError, TypeError):
    """An option the command does not have (a TypeError too, as for any bad keyword)."""


def training_options(**overrides) -> EarlyExitOptions:
    """The command's defaults with overrides, for training from Python; unknown names get a hint."""
    names = [f.name for f in attrs.fields(EarlyExitOptions)]
    unknown = set(overrides) - set(names)
    if unknown:
        hints = [f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
                 for name in sorted(unknown) for close in [difflib.get_close_matches(name, names, n=1)]]
        raise UnknownTrainingOptionError(
            f"unknown training options {', '.join(hints)}; the options are the flags of "
            f"`specframe train early-exit --help` with '-' written '_': {', '.join(sorted(names))}")
    try:
        return EarlyExitOptions(**overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad training option: {exc}") from None
