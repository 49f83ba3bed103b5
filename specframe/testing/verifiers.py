"""`check_verifier`: the contract, the greedy rule, exact rounds (every draw of a round
enumerated: drafts, uniforms, corrections, bonus tokens) and lossless decoding through the engine.
Shapes: K drafts, V vocabulary."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from ..checks import check_verdict
from ..plugins import PluginRegistry
from ..sampling import Sampler, probs_from_logits
from ..types import SamplingConfig
from .common import (KitSettings, check_distribution, check_greedy, describe, factory, registry_or_default)
from .exact import enumerate_outcomes, largest_difference
from .report import CheckFailed, CheckSkipped, ConformanceReport, run_checks
from .toys import KitController, ScriptedController, TableDrafter, TableLM

ROUND_VOCAB = 4  # V of the exact rounds: K = 3 drafts then have 64 chains


def _random_round(rng: torch.Generator, K: int, V: int, sampler: Sampler, with_q: bool):
    """draft_tokens (K,), q (K, V) or None, p (K+1, V) processed like the engine's."""
    p = sampler.probs(2 * torch.randn(K + 1, V, generator=rng))
    if not with_q:
        return torch.randint(0, V, (K,), generator=rng), None, p
    q = sampler.probs(2 * torch.randn(K, V, generator=rng))
    tokens = torch.tensor([sampler.sample(q[i]) for i in range(K)], dtype=torch.long)
    return tokens, (None if sampler.greedy else q), p


def verifier_contract(make, settings: KitSettings, name: str, trials: int = 300) -> str:
    verifier, rng = make(), torch.Generator().manual_seed(settings.seed)
    V = settings.vocab_size
    for config in (SamplingConfig(0.0), settings.sampling):
        sampler = Sampler(attrs.evolve(config, seed=settings.seed))
        for trial in range(trials):
            K = trial % 5
            tokens, q, p = _random_round(rng, K, V, sampler, with_q=trial % 2 == 0)
            check_verdict(verifier.verify(tokens, q, p, sampler), K, V, name)
    return f"{2 * trials} random rounds (K = 0..4, with and without q, greedy and sampled)"


def verifier_greedy_rule(make, settings: KitSettings, trials: int = 300) -> str:
    """With one-hot p (temperature 0): accept while d_i == argmax p_i, then argmax p of the next."""
    verifier, rng = make(), torch.Generator().manual_seed(settings.seed)
    sampler, V = Sampler(SamplingConfig(0.0)), settings.vocab_size
    for trial in range(trials):
        K = trial % 5
        p = sampler.probs(torch.randn(K + 1, V, generator=rng))  # one-hot rows
        best = p.argmax(-1)
        wrong = (best[:K] + torch.randint(1, V, (K,), generator=rng)) % V
        tokens = torch.where(torch.rand(K, generator=rng) < 0.75, best[:K], wrong)
        q = None if trial % 2 else torch.nn.functional.one_hot(tokens, V).float()
        verdict = verifier.verify(tokens, q, p, sampler)
        misses = (tokens != best[:K]).nonzero()
        accepted = int(misses[0]) if len(misses) else K
        if (verdict.accepted_length, verdict.next_token) != (accepted, int(best[accepted])):
            raise CheckFailed(f"drafts {tokens.tolist()} against argmax p {best.tolist()}: returned "
                              f"(accepted {verdict.accepted_length}, next {verdict.next_token}), the greedy rule "
                              f"gives (accepted {accepted}, next {int(best[accepted])})")
    return f"{trials} random greedy rounds"


class PrefixTable:
    """A random distribution for each prefix (float64 logits processed with `config`), for rounds
    whose p and q depend on the drafts before them, as a language model's do."""

    def __init__(self, seed: int, V: int, config: SamplingConfig, scale: float = 2.0):
        self.seed, self.V, self.config, self.scale, self.rows = seed, V, config, scale, {}

    def __call__(self, prefix: tuple[int, ...]) -> torch.Tensor:  # (V,)
        if prefix not in self.rows:
            generator = torch.Generator().manual_seed(hash((self.seed, prefix)) % 2**31)
            logits = self.scale * torch.randn(1, self.V, generator=generator, dtype=torch.float64)
            self.rows[prefix] = probs_from_logits(logits, self.config)[0]
        return self.rows[prefix]


def round_distribution(make, p_of: PrefixTable, q_of: PrefixTable, K: int, with_q: bool,
                       config: SamplingConfig, name: str) -> dict[tuple[int, ...], float]:
    """Exact distribution of K + 1 tokens: drafts d ~ q (with_q=False: q's argmax chain, passed as
    q=None), one `verify` with every draw enumerated, then the target's own tokens up to K + 1."""
    def run(sampler) -> tuple[int, ...]:
        drafts: list[int] = []
        for _ in range(K):
            row = q_of(tuple(drafts))
            drafts.append(sampler.sample(row) if with_q else int(row.argmax()))
        p = torch.stack([p_of(tuple(drafts[:i])) for i in range(K + 1)])  # (K+1, V)
        q_rows = torch.stack([q_of(tuple(drafts[:i])) for i in range(K)]) if with_q else None  # (K, V)
        tokens = torch.tensor(drafts, dtype=torch.long)
        verdict = make().verify(tokens, q_rows, p, sampler)  # a fresh verifier each replay
        check_verdict(verdict, K, p.shape[-1], name)
        committed = [*drafts[: verdict.accepted_length], int(verdict.next_token)]
        while len(committed) < K + 1:
            committed.append(sampler.sample(p_of(tuple(committed))))
        return tuple(committed)

    return enumerate_outcomes(run, config)


def target_joint(p_of: PrefixTable, length: int) -> dict[tuple[int, ...], float]:
    frontier = {(): 1.0}
    for _ in range(length):
        frontier = {prefix + (t,): mass * float(p) for prefix, mass in frontier.items()
                    for t, p in enumerate(p_of(prefix).tolist()) if p > 0}
    return frontier


def verifier_rounds(make, settings: KitSettings, name: str) -> str:
    """For each sampling setting, K = 1..3 and q given or None: the committed tokens of one round,
    completed by the target, follow exactly the target's joint distribution."""
    checked = 0
    for number, config in enumerate(settings.samplings):
        for K in (1, 2, 3):
            for with_q in (True, False):
                seed = settings.seed + 100 * number + 10 * K + with_q
                p_of = PrefixTable(seed, ROUND_VOCAB, config)
                q_of = PrefixTable(seed + 5000, ROUND_VOCAB, config, scale=1.0)
                got = round_distribution(make, p_of, q_of, K, with_q, config, name)
                expected = target_joint(p_of, K + 1)
                difference, worst = largest_difference(got, expected)
                checked += 1
                if difference > settings.tolerance:
                    raise CheckFailed(
                        f"{describe(config)}, {K} draft(s) {'with q' if with_q else 'with q=None'}: the round commits "
                        f"{worst} with probability {got.get(worst, 0.0):.10f}, the target "
                        f"{expected.get(worst, 0.0):.10f} (exact, by enumerating every draw)")
    return f"{checked} rounds exact (K = 1..3, q given and None, {len(settings.samplings)} sampling settings)"


def check_verifier(name: str, registry: PluginRegistry | None = None, *, options: dict | None = None,
                   settings: KitSettings | None = None, sampling: bool = True, only: tuple[str, ...] | None = None,
                   raise_on_failure: bool = True, **more_options) -> ConformanceReport:
    """Check the verifier registered as `name`. sampling=False for a verifier that is lossless for
    greedy decoding only. `only`: check ids, of contract, greedy_rule, rounds, greedy, sampling.
    A verifier with `lossless = False` is held to the contract only."""
    settings = settings or KitSettings()
    registry = registry_or_default(registry)
    make, plugin = factory(registry, "verifier", name, {**(options or {}), **more_options})
    names = {"drafter": "conformance-kit", "controller": "conformance-kit", "verifier": name}
    table = TableLM.random(settings.vocab_size, settings.seed, min_support=2)
    lossless = bool(getattr(make(), "lossless", True))
    greedy_parts = lambda: (TableDrafter.near(table, sample=False), KitController(settings.max_draft), make())  # noqa: E731
    sampled_parts = lambda: (TableDrafter.near(table), ScriptedController(settings.schedule), make())  # noqa: E731

    def unless_lossy(check: Callable[[], str], greedy_only: bool = False) -> Callable[[], str]:
        def run() -> str:
            if not lossless:
                raise CheckSkipped("the verifier says lossless = False")
            if not greedy_only and not sampling:
                raise CheckSkipped("sampling=False: lossless for greedy decoding only")
            return check()
        return run

    checks = [
        ("contract", "verdicts accept at most K drafts and name a token in [0, V)",
         lambda: verifier_contract(make, settings, name)),
        ("greedy_rule", "at temperature 0 it keeps drafts while they equal argmax p",
         unless_lossy(lambda: verifier_greedy_rule(make, settings), greedy_only=True)),
        ("rounds", "each round's committed tokens follow p exactly (drafts, corrections, bonus token)",
         unless_lossy(lambda: verifier_rounds(make, settings, name))),
        ("greedy", "lossless greedy decoding",
         unless_lossy(lambda: check_greedy(table, greedy_parts, settings, names), greedy_only=True)),
        ("sampling", "lossless sampling (exact sequence distribution)",
         unless_lossy(lambda: check_distribution(table, sampled_parts, settings, names))),
    ]
    report = run_checks("verifier", name, plugin, checks, only)
    return report.raise_for_failures() if raise_on_failure else report
