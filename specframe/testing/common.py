"""What every kind of part is checked with: the kit's settings, running the engine, and the two
end-to-end checks (lossless greedy decoding; the exact distribution of sampled generations)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import attrs
import torch
from attrs import field, frozen, validators as v

from ..checks import CONTRACT_MAX_DRAFT
from ..engine import Parts, generate_tokens
from ..interfaces import Controller, Drafter, Verifier
from ..plugins import PluginRegistry
from ..sampling import Sampler
from ..target import TargetModel
from ..types import Draft, SamplingConfig
from .exact import NotEnumerable, autoregressive_distribution, engine_distribution, largest_difference
from .report import CheckFailed
from .stats import expect_fit
from .toys import VOCAB_SIZE, TableLM

# the sampling settings of the distribution checks: T = 1 and T != 1, top-k and top-p; top-k keeps
# the enumeration small (it applies to p and q alike: every draw has at most 2 or 3 outcomes)
DEFAULT_SAMPLINGS = (SamplingConfig(1.0, top_k=2), SamplingConfig(0.6, top_k=2),
                     SamplingConfig(1.6, top_k=3, top_p=0.7))
FLOAT32_TOLERANCE = 5e-6  # float32 rows sum to 1 only within ~1e-7, and the engine's few-row kernels round
# differently from the stock forward the reference uses (measured: 1.0e-6 on tests/test_early_exit.py)


@frozen
class KitSettings:
    """How hard the kit looks. The defaults take a few seconds per part."""

    vocab_size: int = field(default=VOCAB_SIZE, validator=v.ge(4))  # V of the toy models
    seed: int = 0  # base seed of every random draw
    samplings: tuple[SamplingConfig, ...] = DEFAULT_SAMPLINGS  # settings of the distribution checks
    length: int = field(default=5, validator=v.ge(2))  # new tokens per generation in those checks
    schedule: tuple[int, ...] = (3, 1, 2)  # draft lengths the kit's controller asks for (see ScriptedController)
    widths: tuple[int, ...] = (1, 2, 3)  # tree widths it plans in the sampling check (drafters that ask)
    tolerance: float = 1e-9  # exact checks on float64 parts; FLOAT32_TOLERANCE where a part is float32
    max_replays: int = field(default=20_000, validator=v.ge(1))  # engine replays per enumeration
    # the statistical tests, for parts whose randomness does not go through the sampler
    alpha: float = field(default=1e-4, validator=[v.gt(0.0), v.lt(1.0)])  # significance
    draws: int = field(default=300, validator=v.ge(50))  # proposals in the q test
    samples: int = field(default=1000, validator=v.ge(100))  # generations in the distribution test
    greedy_tokens: int = field(default=40, validator=v.ge(4))  # new tokens in the greedy test
    max_draft: int = field(default=4, validator=v.ge(1))  # drafts per round the kit asks for
    # a controller's max_draft() must stay in [0, max_draft_cap]: by default the engine's own limit,
    # so the kit passes what the engine accepts; lower it to hold a part to a tighter bound
    max_draft_cap: int = field(default=CONTRACT_MAX_DRAFT, validator=[v.ge(0), v.le(CONTRACT_MAX_DRAFT)])

    @property
    def sampling(self) -> SamplingConfig:
        """The first sampling setting, seeded."""
        return attrs.evolve(self.samplings[0], seed=self.seed)


def describe(config: SamplingConfig) -> str:
    return f"T={config.temperature:g}, top-k {config.top_k}, top-p {config.top_p:g}"


# ---- driving the engine ----------------------------------------------------------------------
def generate(target: TargetModel, drafter: Drafter | None, controller: Controller, verifier: Verifier,
             prompt: list[int], max_new_tokens: int, config: SamplingConfig, names: dict | None = None) -> list[int]:
    """One generation through specframe's engine; returns the new tokens."""
    parts = Parts(target, drafter, controller, verifier, names or {})
    stream = generate_tokens(parts, list(prompt), Sampler(config, device=target.device), max_new_tokens, set())
    return [token for committed in stream for token in committed]


@torch.inference_mode()
def plain_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with a full forward pass per token (no cache): the reference."""
    ids = list(prompt)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]  # (V,)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def sample_sequences(target: TargetModel, drafter, controller, verifier, prompt: list[int], length: int,
                     config: SamplingConfig, samples: int, names: dict | None = None) -> Counter:
    """Counts of the sequences the engine generates, one generation per seed config.seed + i."""
    counts: Counter = Counter()
    for i in range(samples):
        seeded = attrs.evolve(config, seed=(config.seed or 0) + i)
        counts[tuple(generate(target, drafter, controller, verifier, prompt, length, seeded, names))] += 1
    return counts


def greedy_prompt(model) -> list[int]:
    """A prompt the model itself would write (so copying drafters find repeats): 1 + 11 greedy tokens."""
    return [1, *plain_greedy(model, [1], 11)]


def is_float64(model) -> bool:
    table = getattr(model, "log_probs", None)
    weights = table if table is not None else next(model.parameters())
    return weights.dtype == torch.float64


class QWatch(Drafter):
    """Passes a drafter through, noting whether any q it reported was not float64."""

    def __init__(self, inner: Drafter, seen: set):
        self.inner, self.seen = inner, seen

    def begin(self, target, prompt_ids, sampler) -> None:
        self.inner.begin(target, prompt_ids, sampler)

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        draft = self.inner.propose(context, max_tokens, controller, sampler)
        if isinstance(draft, Draft) and isinstance(draft.q, torch.Tensor):
            self.seen.add(draft.q.dtype)
        return draft

    def rollback(self, valid_length: int) -> None:
        self.inner.rollback(valid_length)


# ---- the two end-to-end checks -----------------------------------------------------------------
def check_greedy(model, make_parts: Callable[[], tuple], settings: KitSettings, names: dict) -> str:
    """The engine's greedy tokens equal plain greedy decoding."""
    prompt = greedy_prompt(model)
    expected = plain_greedy(model, prompt, settings.greedy_tokens)
    drafter, controller, verifier = make_parts()
    got = generate(TargetModel(model), drafter, controller, verifier, prompt, settings.greedy_tokens,
                   SamplingConfig(0.0, seed=settings.seed), names)
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise CheckFailed(f"greedy output differs from plain greedy decoding at new token {at}: "
                          f"got {got[at:at + 5]}..., expected {expected[at:at + 5]}...")
    return f"{len(got)} tokens equal plain greedy decoding"


def check_distribution(model, make_parts: Callable[[], tuple], settings: KitSettings, names: dict) -> str:
    """For each sampling setting, the engine's distribution of generated sequences equals plain
    sampling's: computed exactly by enumeration, or by chi-square where the parts draw randomness
    the enumeration cannot follow. On a model other than the table LM, at most 4 new tokens."""
    prompt = greedy_prompt(model)
    length = settings.length if isinstance(model, TableLM) else min(settings.length, 4)
    notes = []
    for config in settings.samplings:
        try:
            notes.append(_exact_distribution(model, make_parts, prompt, length, config, settings, names))
        except NotEnumerable as why:
            notes.append(_sampled_distribution(model, make_parts, prompt, length, config, settings, names, why))
    return "; ".join(notes)


def _exact_distribution(model, make_parts, prompt, length, config, settings: KitSettings, names) -> str:
    seen: set = set()

    def watched() -> tuple:
        drafter, controller, verifier = make_parts()
        return (QWatch(drafter, seen) if drafter is not None else None), controller, verifier

    got = engine_distribution(model, watched, prompt, length, config, names=names, max_replays=settings.max_replays)
    expected = autoregressive_distribution(model, prompt, length, config)
    exact = is_float64(model) and seen <= {torch.float64}
    tolerance = settings.tolerance if exact else max(settings.tolerance, FLOAT32_TOLERANCE)
    difference, worst = largest_difference(got, expected)
    if difference > tolerance:
        raise CheckFailed(
            f"{describe(config)}: the engine generates {worst} with probability {got.get(worst, 0.0):.10f}, plain "
            f"sampling with {expected.get(worst, 0.0):.10f} (exact, by enumerating every draw; tolerance {tolerance:g})")
    return f"{describe(config)}: exact over {len(expected)} sequences (|difference| <= {difference:.1e})"


def _sampled_distribution(model, make_parts, prompt, length, config, settings: KitSettings, names, why) -> str:
    config = attrs.evolve(config, seed=settings.seed)
    exact = autoregressive_distribution(model, prompt, length, config)
    drafter, controller, verifier = make_parts()
    counts = sample_sequences(TargetModel(model), drafter, controller, verifier, prompt, length, config,
                              settings.samples, names)
    expected = {sequence: settings.samples * p for sequence, p in exact.items()}
    fit = expect_fit(f"{describe(config)}: distribution of {settings.samples} generated {length}-token sequences",
                     counts, expected, settings.alpha)
    return f"{describe(config)}: sampled, not exact ({why}): {fit}"


# ---- building the part under test --------------------------------------------------------------
def registry_or_default(registry: PluginRegistry | None) -> PluginRegistry:
    return registry if registry is not None else PluginRegistry(autoload=True)


def factory(registry: PluginRegistry, kind: str, name: str, options: dict) -> tuple[Callable[[], object], str]:
    """A function building fresh instances of the part, and the name of its plugin."""
    info = registry.get(kind, name)  # raises UnknownComponentError / PluginLoadError as usual
    registry.create(kind, name, options)  # bad options fail here, before any check runs
    return (lambda: registry.create(kind, name, options)), info.plugin


def reference_verifier() -> Verifier:
    """specframe's own verifier (greedy at temperature 0, else speculative sampling), which the
    kit pairs with the drafter or controller under test."""
    from ..verifiers.speculative import AutoVerifier

    return AutoVerifier()
