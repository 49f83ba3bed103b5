"""The conformance kit: does a drafter, controller or verifier keep specframe's contract, and is
decoding with it still lossless? For plugin authors, from pytest:

    from specframe.testing import check_drafter

    def test_my_drafter_conforms():
        check_drafter("mine")  # raises ConformanceError (an AssertionError) naming what broke

`check_drafter`, `check_controller` and `check_verifier` build the part by its registered name
(from `registry`, by default one that loads every installed plugin), run the checks below on
tiny toy models and return a `ConformanceReport`. Every random draw is seeded, so a part passes
or fails the same way on every run.

- contract: drafts are (K,) int64 in [0, V) with K <= max_tokens, q rows are distributions,
  confidences lie in [0, 1], drafting stops when the controller says so (drafter); max_draft is
  an int in [0, cap], keep_drafting a bool, update takes any RoundStats (controller); verdicts
  are in range and follow the greedy rule at temperature 0 (verifier);
- q is the distribution the drafts are sampled from: at a fixed state, many draws of the drafted
  tokens against the q the drafter reports, by chi-square; a drafter that returns q=None
  (one-hot) must draft the same tokens whatever the random seed;
- rollback keeps the drafter's caches consistent: during a generation with random rejections,
  every draft equals the one a fresh drafter makes from the committed tokens alone;
- lossless greedy decoding: the engine's tokens equal plain greedy decoding (a full forward pass
  per token) of a tiny random Llama;
- lossless sampling: the distribution of whole generated sequences equals the one computed
  exactly from the target, on a table-driven toy LM with a tiny vocabulary (chi-square);
  for a verifier also its first committed token against p_1 and its bonus token against p_2.

References: Leviathan et al. 2023 and Chen et al. 2023 (speculative sampling is exact for any
drafter whose q is truthful, so a wrong output distribution means a lying q, a broken verifier
or a broken rollback). Shapes: K drafts, V vocabulary, T tokens.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator

import attrs
import numpy as np
import torch
from attrs import define, field, frozen, validators as v

from .checks import MAX_DRAFT_LENGTH, check_draft, check_verdict
from .engine import Parts, generate_tokens
from .errors import PluginContractError
from .interfaces import Controller, Drafter, Verifier
from .plugins import PluginRegistry
from .sampling import Sampler, probs_from_logits
from .target import TargetModel
from .types import Draft, RoundStats, SamplingConfig, Verdict

__all__ = [
    "check_drafter", "check_controller", "check_verifier", "ConformanceError", "ConformanceReport",
    "CheckResult", "KitSettings", "tiny_llama", "TableLM", "TableDrafter", "KitController",
    "exact_sequence_distribution", "sample_sequences", "plain_greedy", "generate", "reference_verifier",
    "chi_square", "ChiSquare",
]

VOCAB_SIZE = 16  # every toy model of the kit has this vocabulary, so parts can be swapped


@frozen
class KitSettings:
    """How hard the kit looks. The defaults take a few seconds per part."""

    vocab_size: int = field(default=VOCAB_SIZE, validator=v.ge(4))  # V of the toy models
    seed: int = 0  # base seed of every random draw
    alpha: float = field(default=1e-4, validator=[v.gt(0.0), v.lt(1.0)])  # chi-square significance
    draws: int = field(default=300, validator=v.ge(50))  # proposals in the q-sampling test
    samples: int = field(default=1000, validator=v.ge(100))  # generations in the exact-distribution test
    length: int = field(default=5, validator=v.ge(2))  # new tokens per generation in that test
    temperature: float = 1.0  # sampling settings of the distribution tests
    top_k: int = 0
    top_p: float = 1.0
    greedy_tokens: int = field(default=40, validator=v.ge(4))  # new tokens in the greedy test
    max_draft: int = field(default=4, validator=v.ge(1))  # drafts per round the kit asks for
    # a controller's max_draft() must stay in [0, max_draft_cap]: by default the engine's own limit,
    # so the kit passes what the engine accepts; lower it to hold a part to a tighter bound
    max_draft_cap: int = field(default=MAX_DRAFT_LENGTH, validator=[v.ge(0), v.le(MAX_DRAFT_LENGTH)])

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.seed)


# ---- results ---------------------------------------------------------------------------------
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


def _run_checks(kind: str, name: str, plugin: str, checks: list[tuple[str, str, Callable[[], str | None]]],
                only: tuple[str, ...] | None) -> ConformanceReport:
    """Run (id, property, function) checks; a function passes by returning, fails by raising."""
    results = []
    for check, prop, function in checks:
        if only is not None and check not in only:
            continue
        started = time.perf_counter()
        try:
            with _single_thread():
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
def _single_thread() -> Iterator[None]:
    """Toy models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- toy models ------------------------------------------------------------------------------
def tiny_llama(vocab_size: int = VOCAB_SIZE, num_layers: int = 6, seed: int = 0, logit_scale: float = 10.0):
    """A random Llama (hidden size 32) small enough to run hundreds of generations a second.

    Its final norm is scaled by `logit_scale` so that its distributions are far from uniform and
    its greedy choices are not near ties (float error then cannot flip them).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(logit_scale)
    return model


class TableLM(torch.nn.Module):
    """A toy causal LM whose next-token distribution depends on the last two tokens only.

    `log_probs[prev, cur]` (V,) is the log-distribution of the token after `cur` when `prev` came
    before it (prev = 0 at the first position); -inf marks impossible tokens. It keeps its history
    in the KV cache the engine hands it (token ids stored as keys), so a wrong rollback of the
    target's cache changes what it predicts.
    """

    def __init__(self, log_probs: torch.Tensor):  # (V, V, V)
        super().__init__()
        from transformers import PretrainedConfig

        V = log_probs.shape[-1]
        self.config = PretrainedConfig(vocab_size=V, num_hidden_layers=1)
        self.lm_head = torch.nn.Linear(1, V, bias=False)  # only its shape is used
        self.register_buffer("log_probs", log_probs.float())

    @classmethod
    def random(cls, vocab_size: int = VOCAB_SIZE, seed: int = 0, max_support: int = 3) -> "TableLM":
        """Each row puts all its mass on 1..max_support tokens, unevenly."""
        generator = torch.Generator().manual_seed(seed)
        V = vocab_size
        log_probs = torch.full((V, V, V), float("-inf"))
        for prev in range(V):
            for cur in range(V):
                support = int(torch.randint(1, max_support + 1, (), generator=generator))
                tokens = torch.randperm(V, generator=generator)[:support]
                weights = torch.rand(support, generator=generator) ** 2 + 0.05
                log_probs[prev, cur, tokens] = (weights / weights.sum()).log()
        return cls(log_probs)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, cache=None, **kwargs):
        """(1, T) ids -> an object whose .logits is (1, T, V)."""
        ids = input_ids[0].long().cpu()  # (T,)
        history = torch.empty(0, dtype=torch.long)
        if cache is not None and cache.get_seq_length() > 0:
            history = cache.layers[0].keys[0, 0, :, 0].long()  # (S,)
        if cache is not None:
            slot = ids.float().view(1, 1, -1, 1)
            cache.update(slot, slot, 0)
        full = torch.cat([history, ids])  # (S + T,)
        prev = torch.cat([full.new_zeros(1), full[:-1]])[-len(ids):]  # (T,)
        return types.SimpleNamespace(logits=self.log_probs[prev, ids][None])


# ---- parts the kit drives other parts with ---------------------------------------------------
@define
class KitController(Controller):
    """Draft up to k tokens; with stop_after set, say stop after that many."""

    k: int = 4
    stop_after: int | None = None

    def max_draft(self) -> int:
        return self.k

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return self.stop_after is None or drafted < self.stop_after


@define
class TableDrafter(Drafter):
    """A model-free drafter on a (prev, cur) table, like TableLM's. sample=True draws each token from
    q = sampler.probs(row) and returns q; sample=False drafts the row's argmax with q=None."""

    log_probs: torch.Tensor = field(eq=False, repr=False)  # (V, V, V), any finite values
    sample: bool = True

    @classmethod
    def near(cls, target: TableLM, seed: int = 1, noise: float = 1.0, sample: bool = True) -> "TableDrafter":
        """A drafter whose table is a noisy copy of `target`'s, with every token possible."""
        generator = torch.Generator().manual_seed(seed)
        base = target.log_probs.clamp(min=-3.0)
        return cls(base + noise * torch.randn(base.shape, generator=generator), sample)

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        prev, cur = (context[-2] if len(context) > 1 else 0), context[-1]
        tokens, rows, confidences = [], [], []
        while len(tokens) < max_tokens:
            q_i = sampler.probs(self.log_probs[prev, cur][None])[0]  # (V,)
            token = sampler.sample(q_i) if self.sample else int(self.log_probs[prev, cur].argmax())
            tokens.append(token)
            rows.append(q_i)
            confidences.append(float(q_i.max()))
            prev, cur = cur, token
            if not controller.keep_drafting(len(tokens), confidences[-1]):
                break
        q = torch.stack(rows) if self.sample and tokens and not sampler.greedy else None
        return Draft(torch.tensor(tokens, dtype=torch.long), q, tuple(confidences))


@define
class _ChaosVerifier(Verifier):
    """Accepts a random number of drafts and adds a random token (lossy on purpose): it makes the
    engine roll back often and the committed text hard to predict from rejected drafts."""

    lossless = False
    rng: random.Random = field(factory=lambda: random.Random(0))

    def verify(self, draft_tokens, q, p, sampler) -> Verdict:
        accepted = self.rng.randint(0, draft_tokens.shape[0])
        return Verdict(accepted, self.rng.randrange(p.shape[-1]))  # a random correction


class _SpyDrafter(Drafter):
    """Records every proposal of the drafter it wraps: (context, max_tokens, drafted tokens)."""

    def __init__(self, inner: Drafter):
        self.inner, self.calls = inner, []

    def begin(self, target, prompt_ids, sampler) -> None:
        self.inner.begin(target, prompt_ids, sampler)

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        draft = self.inner.propose(context, max_tokens, controller, sampler)
        self.calls.append((list(context), max_tokens, draft.tokens.tolist()))
        return draft

    def rollback(self, valid_length: int) -> None:
        self.inner.rollback(valid_length)


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


@torch.inference_mode()
def exact_sequence_distribution(model, prompt: list[int], length: int, config: SamplingConfig,
                                max_outcomes: int = 20_000) -> dict[tuple[int, ...], float]:
    """P(the next `length` tokens) under plain sampling with `config`, by enumerating prefixes."""
    device = next(model.parameters()).device
    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, mass in frontier.items():
            logits = model(input_ids=torch.tensor([prompt + list(prefix)], device=device)).logits[0, -1:]
            p = probs_from_logits(logits, config)[0].double().cpu()  # (V,)
            for token in p.nonzero().flatten().tolist():
                grown[prefix + (token,)] = mass * float(p[token])
            if len(grown) > max_outcomes:
                raise CheckSkipped(f"more than {max_outcomes} possible sequences; lower length or set top_k")
        frontier = grown
    return frontier


def sample_sequences(target: TargetModel, drafter, controller, verifier, prompt: list[int], length: int,
                     config: SamplingConfig, samples: int, names: dict | None = None) -> Counter:
    """Counts of the sequences the engine generates, one generation per seed config.seed + i."""
    counts: Counter = Counter()
    for i in range(samples):
        seeded = attrs.evolve(config, seed=config.seed + i)
        counts[tuple(generate(target, drafter, controller, verifier, prompt, length, seeded, names))] += 1
    return counts


# ---- statistics ------------------------------------------------------------------------------
@frozen
class ChiSquare:
    """Pearson's chi-square goodness of fit."""

    statistic: float
    dof: int
    p_value: float
    worst: str = ""  # the cell that contributes most, for messages

    def describe(self, alpha: float | None = None) -> str:
        below = f" < {alpha:.2g}" if alpha is not None and self.p_value < alpha else ""
        return (f"chi-square {self.statistic:.1f} on {self.dof} degrees of freedom, p = {self.p_value:.2g}{below}"
                + (f" (worst cell {self.worst})" if self.worst else ""))


def chi_square(observed: Counter, expected: dict, min_expected: float = 5.0) -> ChiSquare:
    """Compare counts with expected counts; cells expected below `min_expected` are pooled.

    A count in a cell with expected count 0 gives p = 0 (an impossible outcome happened).
    """
    impossible = [key for key, count in observed.items() if count and expected.get(key, 0.0) <= 0]
    if impossible:
        key = impossible[0]
        return ChiSquare(math.inf, 0, 0.0, f"{key} occurred {observed[key]} times but has probability 0")
    cells = [(key, observed.get(key, 0), e) for key, e in expected.items() if e >= min_expected]
    rest_observed = sum(observed.get(key, 0) for key, e in expected.items() if 0 < e < min_expected)
    rest_expected = sum(e for e in expected.values() if 0 < e < min_expected)
    if rest_expected > 0:
        cells.append(("(rare outcomes pooled)", rest_observed, rest_expected))
    if len(cells) < 2:
        return ChiSquare(0.0, 0, 1.0)
    terms = [((o - e) ** 2 / e, key, o, e) for key, o, e in cells]
    statistic = sum(t[0] for t in terms)
    dof = len(cells) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    _, key, o, e = max(terms, key=lambda t: t[0])
    return ChiSquare(statistic, dof, p_value, f"{key}: observed {o}, expected {e:.1f}")


def _expect_fit(what: str, observed: Counter, expected: dict, alpha: float) -> str:
    result = chi_square(observed, expected)
    if result.p_value < alpha:
        raise CheckFailed(f"{what}: {result.describe(alpha)}")
    return result.describe()


# ---- shared checks ---------------------------------------------------------------------------
def _greedy_prompt(model, settings: KitSettings) -> list[int]:
    """A prompt the model itself would write (so copying drafters find repeats): 1 + 11 greedy tokens."""
    return [1, *plain_greedy(model, [1], 11)]


def _check_greedy(model, make_parts: Callable[[], tuple], settings: KitSettings, names: dict) -> str:
    """The engine's greedy tokens equal plain greedy decoding."""
    prompt = _greedy_prompt(model, settings)
    expected = plain_greedy(model, prompt, settings.greedy_tokens)
    drafter, controller, verifier = make_parts()
    got = generate(TargetModel(model), drafter, controller, verifier, prompt, settings.greedy_tokens,
                   SamplingConfig(0.0, seed=settings.seed), names)
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise CheckFailed(f"greedy output differs from plain greedy decoding at new token {at}: "
                          f"got {got[at:at + 5]}..., expected {expected[at:at + 5]}...")
    return f"{len(got)} tokens equal plain greedy decoding"


def _check_distribution(model, make_parts: Callable[[], tuple], settings: KitSettings, names: dict) -> str:
    """The engine's sequence distribution equals the exact one (chi-square).

    On the table LM every row has at most 3 tokens. Any other model is slower: top-k (2 unless
    set), at most 4 tokens and half the samples keep the test short and its outcomes few.
    """
    prompt = _greedy_prompt(model, settings)
    config, length, samples = settings.sampling, settings.length, settings.samples
    if not isinstance(model, TableLM):
        config, length, samples = attrs.evolve(config, top_k=settings.top_k or 2), min(length, 4), samples // 2
    exact = exact_sequence_distribution(model, prompt, length, config)
    drafter, controller, verifier = make_parts()
    counts = sample_sequences(TargetModel(model), drafter, controller, verifier, prompt, length,
                              config, samples, names)
    expected = {sequence: samples * p for sequence, p in exact.items()}
    return _expect_fit(f"distribution of {samples} generated {length}-token sequences "
                       f"(temperature {config.temperature}, top-k {config.top_k}, top-p {config.top_p})",
                       counts, expected, settings.alpha)


def _registry(registry: PluginRegistry | None) -> PluginRegistry:
    return registry if registry is not None else PluginRegistry(autoload=True)


def _factory(registry: PluginRegistry, kind: str, name: str, options: dict) -> tuple[Callable[[], object], str]:
    """A function building fresh instances of the part, and the name of its plugin."""
    info = registry.get(kind, name)  # raises UnknownComponentError / PluginLoadError as usual
    registry.create(kind, name, options)  # bad options fail here, before any check runs
    return (lambda: registry.create(kind, name, options)), info.plugin


def reference_verifier() -> Verifier:
    """specframe's own verifier (greedy at temperature 0, else speculative sampling), which the
    kit pairs with the drafter or controller under test."""
    from .verifiers.speculative import AutoVerifier

    return AutoVerifier()


# ---- drafters --------------------------------------------------------------------------------
class _Harness:
    """A drafter in the state the engine leaves it in at the start of a round (prompt prefilled)."""

    def __init__(self, model, drafter: Drafter, prompt: list[int], config: SamplingConfig):
        self.target, self.drafter = TargetModel(model), drafter
        self.target.reset()
        sampler = Sampler(config, device=self.target.device)
        logits = self.target.forward(torch.tensor(prompt))  # (T, V)
        self.context = [*prompt, sampler.sample(sampler.probs(logits[-1:])[0])]
        drafter.begin(self.target, list(prompt), sampler)

    def propose(self, max_tokens: int, controller: Controller, config: SamplingConfig) -> Draft:
        """Draft, then reject it all: roll the target and the drafter back to the committed length."""
        sampler = Sampler(config, device=self.target.device)
        draft = self.drafter.propose(list(self.context), max_tokens, controller, sampler)
        valid = len(self.context) - 1
        self.target.rollback(valid)
        self.drafter.rollback(valid)
        return draft


def _model_for(make: Callable[[], Drafter], settings: KitSettings) -> tuple[object, str]:
    """The table LM when the drafter can run on it (fast, exact), else the tiny Llama."""
    table = TableLM.random(settings.vocab_size, settings.seed)
    try:
        with _single_thread():
            harness = _Harness(table, make(), _greedy_prompt(table, settings), settings.sampling)
            harness.propose(settings.max_draft, KitController(settings.max_draft), settings.sampling)
        return table, "table LM"
    except Exception as exc:
        llama = tiny_llama(settings.vocab_size, seed=settings.seed)
        return llama, f"tiny Llama (not the table LM: {type(exc).__name__})"


def _check_confidences(draft: Draft, name: str) -> None:
    values = draft.confidences
    if values and (len(values) != len(draft) or not all(0.0 <= c <= 1.0 for c in values)):
        raise PluginContractError(name, "confidences hold one value in [0, 1] per draft token",
                                  f"{len(draft)} tokens, confidences {values}")


def _drafter_contract(make, model, settings: KitSettings, name: str) -> str:
    """Shapes, token range, q rows, confidences, budgets and the controller's stop, greedy and sampled."""
    prompt = _greedy_prompt(model, settings)
    lengths = []
    for config in (SamplingConfig(0.0, seed=settings.seed), settings.sampling):
        harness = _Harness(model, make(), prompt, config)
        V = harness.target.vocab_size
        for budget in (1, 2, settings.max_draft):
            draft = harness.propose(budget, KitController(budget), config)
            check_draft(draft, budget, V, name)
            _check_confidences(draft, name)
            lengths.append(len(draft))
        draft = harness.propose(settings.max_draft, KitController(settings.max_draft, stop_after=1), config)
        check_draft(draft, settings.max_draft, V, name)
        if len(draft) > 1:
            raise CheckFailed(f"drafted {len(draft)} tokens although controller.keep_drafting(1, ...) returned False")
    return f"draft lengths {lengths} for budgets (1, 2, {settings.max_draft}), greedy then sampled"


def _drafter_q(make, model, settings: KitSettings, name: str) -> str:
    """At one state, the drafted tokens' frequencies match the q the drafter reports."""
    config, K = settings.sampling, settings.max_draft
    harness = _Harness(model, make(), _greedy_prompt(model, settings), config)
    V = harness.target.vocab_size
    observed = [Counter() for _ in range(K)]
    expected = [torch.zeros(V, dtype=torch.float64) for _ in range(K)]
    deterministic: Counter = Counter()
    for i in range(settings.draws):
        draft = harness.propose(K, KitController(K), attrs.evolve(config, seed=config.seed + 1 + i))
        check_draft(draft, K, V, name)
        if draft.q is None:
            deterministic[tuple(draft.tokens.tolist())] += 1
            continue
        for position, token in enumerate(draft.tokens.tolist()):
            observed[position][token] += 1
            expected[position] += draft.q[position].double().cpu()
    if len(deterministic) > 1:
        shown = ", ".join(f"{list(k)} x{c}" for k, c in deterministic.most_common(3))
        raise CheckFailed(f"it returned q=None (a one-hot q, so no randomness) but drafted different tokens "
                          f"from the same state under different seeds: {shown}")
    notes = [f"q=None drafts identical over {sum(deterministic.values())} seeds"] if deterministic else []
    for position in range(K):
        if sum(observed[position].values()) >= 50:
            fit = _expect_fit(f"drafted token {position + 1} against its q over {settings.draws} draws",
                              observed[position], dict(enumerate(expected[position].tolist())), settings.alpha / K)
            notes.append(f"token {position + 1}: {fit}")
    if not notes:
        raise CheckSkipped(f"drafted too little in {settings.draws} draws to test q")
    return "; ".join(notes)


def _drafter_rollback(make, model, settings: KitSettings, names: dict, replays: int = 24) -> str:
    """Run a generation with random rejections, then replay each round on a fresh drafter."""
    prompt = _greedy_prompt(model, settings)
    spy = _SpyDrafter(make())
    generate(TargetModel(model), spy, KitController(settings.max_draft), _ChaosVerifier(random.Random(settings.seed)),
             prompt, settings.greedy_tokens, SamplingConfig(0.0, seed=settings.seed), names)
    greedy = Sampler(SamplingConfig(0.0))
    for context, budget, drafted in spy.calls[:replays]:
        target, fresh = TargetModel(model), make()
        target.reset()
        target.forward(torch.tensor(prompt))
        fresh.begin(target, list(prompt), greedy)
        if len(context) - 1 > len(prompt):
            target.forward(torch.tensor(context[len(prompt) : -1]))
        again = fresh.propose(list(context), budget, KitController(budget), greedy).tokens.tolist()
        if again != drafted:
            raise CheckFailed(
                f"after the engine's rollbacks, with {len(context)} tokens committed, it drafted {drafted}, but a "
                f"fresh drafter given the same committed tokens drafts {again}: its state kept rejected tokens"
            )
    rounds = len(spy.calls)
    drafted_total = sum(len(d) for _, _, d in spy.calls)
    return f"{min(rounds, replays)} of {rounds} rounds replayed ({drafted_total} drafts, random rejections)"


def check_drafter(name: str, registry: PluginRegistry | None = None, *, options: dict | None = None,
                  settings: KitSettings | None = None, target_model=None, only: tuple[str, ...] | None = None,
                  raise_on_failure: bool = True, **more_options) -> ConformanceReport:
    """Check the drafter registered as `name`, built with `options` (and any extra keyword options).

    `target_model`: run every check on this HF causal LM instead of the toy models (for a drafter
    that needs a particular target, such as a trained early-exit head). `only`: check ids to run,
    of contract, q_sampling, rollback, greedy, sampling.
    """
    settings = settings or KitSettings()
    registry = _registry(registry)
    make, plugin = _factory(registry, "drafter", name, {**(options or {}), **more_options})
    names = {"drafter": name, "controller": "conformance-kit", "verifier": "auto"}
    if target_model is not None:
        sampling_model, which = target_model, "the given target model"
        llama = target_model
    else:
        sampling_model, which = _model_for(make, settings)
        llama = tiny_llama(settings.vocab_size, seed=settings.seed)
    kit_parts = lambda: (make(), KitController(settings.max_draft), reference_verifier())  # noqa: E731
    checks = [
        ("contract", "drafts keep the shape, range, q and controller contract",
         lambda: _drafter_contract(make, sampling_model, settings, name)),
        ("q_sampling", "q is the distribution the drafts are sampled from",
         lambda: _drafter_q(make, sampling_model, settings, name)),
        ("rollback", "rollback keeps the drafter's caches consistent",
         lambda: _drafter_rollback(make, llama, settings, names)),
        ("greedy", "lossless greedy decoding", lambda: _check_greedy(llama, kit_parts, settings, names)),
        ("sampling", "lossless sampling (exact sequence distribution)",
         lambda: f"on the {which}: " + _check_distribution(sampling_model, kit_parts, settings, names)),
    ]
    report = _run_checks("drafter", name, plugin, checks, only)
    return report.raise_for_failures() if raise_on_failure else report


# ---- controllers -----------------------------------------------------------------------------
def _controller_contract(make, settings: KitSettings, name: str, rounds: int = 200) -> str:
    """Drive the controller through random rounds, checking what it returns each time."""
    controller, rng = make(), random.Random(settings.seed)
    asked = []
    for generation in range(3):
        controller.begin()
        for _ in range(rounds):
            k = controller.max_draft()
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= settings.max_draft_cap:
                raise CheckFailed(f"max_draft() returned {k!r}; it must be an int in [0, {settings.max_draft_cap}]")
            asked.append(k)
            confidences: list[float] = []
            while len(confidences) < min(k, 8):
                confidences.append(rng.random())
                keep = controller.keep_drafting(len(confidences), confidences[-1])
                if not isinstance(keep, (bool, np.bool_)):
                    raise CheckFailed(f"keep_drafting() returned {keep!r} ({type(keep).__name__}); it must be a bool")
                if not keep:
                    break
            drafted = len(confidences)
            accepted = drafted if rng.random() < 0.3 else rng.randint(0, drafted)
            controller.update(RoundStats(drafted, accepted, tuple(confidences), rng.random() / 100, rng.random() / 50))
    mean = sum(asked) / len(asked)
    return f"max_draft() over {len(asked)} rounds: min {min(asked)}, mean {mean:.1f}, max {max(asked)}"


def check_controller(name: str, registry: PluginRegistry | None = None, *, options: dict | None = None,
                     settings: KitSettings | None = None, only: tuple[str, ...] | None = None,
                     raise_on_failure: bool = True, **more_options) -> ConformanceReport:
    """Check the controller registered as `name`. `only`: check ids, of contract, greedy, sampling."""
    settings = settings or KitSettings()
    registry = _registry(registry)
    make, plugin = _factory(registry, "controller", name, {**(options or {}), **more_options})
    names = {"drafter": "conformance-kit", "controller": name, "verifier": "auto"}
    table = TableLM.random(settings.vocab_size, settings.seed)
    greedy_parts = lambda: (TableDrafter.near(table, sample=False), make(), reference_verifier())  # noqa: E731
    sampled_parts = lambda: (TableDrafter.near(table), make(), reference_verifier())  # noqa: E731
    checks = [
        ("contract", "max_draft is an int in bounds, keep_drafting a bool, update takes any RoundStats",
         lambda: _controller_contract(make, settings, name)),
        ("greedy", "lossless greedy decoding", lambda: _check_greedy(table, greedy_parts, settings, names)),
        ("sampling", "lossless sampling (exact sequence distribution)",
         lambda: _check_distribution(table, sampled_parts, settings, names)),
    ]
    report = _run_checks("controller", name, plugin, checks, only)
    return report.raise_for_failures() if raise_on_failure else report


# ---- verifiers -------------------------------------------------------------------------------
def _random_round(rng: torch.Generator, K: int, V: int, sampler: Sampler, with_q: bool):
    """draft_tokens (K,), q (K, V) or None, p (K+1, V) processed like the engine's."""
    p = sampler.probs(2 * torch.randn(K + 1, V, generator=rng))
    if not with_q:
        return torch.randint(0, V, (K,), generator=rng), None, p
    q = sampler.probs(2 * torch.randn(K, V, generator=rng))
    tokens = torch.tensor([sampler.sample(q[i]) for i in range(K)], dtype=torch.long)
    return tokens, (None if sampler.greedy else q), p


def _verifier_contract(make, settings: KitSettings, name: str, trials: int = 300) -> str:
    verifier, rng = make(), torch.Generator().manual_seed(settings.seed)
    V = settings.vocab_size
    for config in (SamplingConfig(0.0), settings.sampling):
        sampler = Sampler(attrs.evolve(config, seed=settings.seed))
        for trial in range(trials):
            K = trial % 5
            tokens, q, p = _random_round(rng, K, V, sampler, with_q=trial % 2 == 0)
            check_verdict(verifier.verify(tokens, q, p, sampler), K, V, name)
    return f"{2 * trials} random rounds (K = 0..4, with and without q, greedy and sampled)"


def _verifier_greedy_rule(make, settings: KitSettings, trials: int = 300) -> str:
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


def _verifier_first_token(make, settings: KitSettings) -> str:
    """One draft d ~ q (or a fixed d, q=None): the first committed token must follow p_1 and,
    when d was accepted, the bonus token p_2 (Leviathan et al. 2023, Theorem 1)."""
    verifier, generator = make(), torch.Generator().manual_seed(settings.seed)
    V, trials = settings.vocab_size, 2 * settings.samples
    probe = Sampler(settings.sampling)
    p = probe.probs(2 * torch.randn(2, V, generator=generator))  # (2, V)
    q = probe.probs(2 * torch.randn(1, V, generator=generator))  # (1, V)
    notes = []
    for with_q in (True, False):
        first, bonus = Counter(), Counter()
        for i in range(trials):
            sampler = Sampler(attrs.evolve(settings.sampling, seed=settings.seed + i))
            d = sampler.sample(q[0]) if with_q else int(q[0].argmax())
            verdict = verifier.verify(torch.tensor([d]), q if with_q else None, p, sampler)
            first[d if verdict.accepted_length else verdict.next_token] += 1
            if verdict.accepted_length:
                bonus[verdict.next_token] += 1
        label = "with q" if with_q else "with q=None"
        fit = _expect_fit(f"first committed token ({label}) against p_1 over {trials} rounds", first,
                          {t: trials * float(p[0, t]) for t in range(V)}, settings.alpha / 4)
        n = sum(bonus.values())
        _expect_fit(f"bonus token after an accepted draft ({label}) against p_2 over {n} rounds", bonus,
                    {t: n * float(p[1, t]) for t in range(V)}, settings.alpha / 4)
        notes.append(f"{label}: {fit}")
    return "; ".join(notes)


def check_verifier(name: str, registry: PluginRegistry | None = None, *, options: dict | None = None,
                   settings: KitSettings | None = None, sampling: bool = True, only: tuple[str, ...] | None = None,
                   raise_on_failure: bool = True, **more_options) -> ConformanceReport:
    """Check the verifier registered as `name`. sampling=False for a verifier that is lossless for
    greedy decoding only. `only`: check ids, of contract, greedy_rule, first_token, greedy, sampling.
    A verifier with `lossless = False` is held to the contract only."""
    settings = settings or KitSettings()
    registry = _registry(registry)
    make, plugin = _factory(registry, "verifier", name, {**(options or {}), **more_options})
    names = {"drafter": "conformance-kit", "controller": "conformance-kit", "verifier": name}
    table = TableLM.random(settings.vocab_size, settings.seed)
    lossless = bool(getattr(make(), "lossless", True))
    k = settings.max_draft
    greedy_parts = lambda: (TableDrafter.near(table, sample=False), KitController(k), make())  # noqa: E731
    sampled_parts = lambda: (TableDrafter.near(table), KitController(k), make())  # noqa: E731

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
         lambda: _verifier_contract(make, settings, name)),
        ("greedy_rule", "at temperature 0 it keeps drafts while they equal argmax p",
         unless_lossy(lambda: _verifier_greedy_rule(make, settings), greedy_only=True)),
        ("first_token", "the first committed token follows p_1, a bonus token p_2",
         unless_lossy(lambda: _verifier_first_token(make, settings))),
        ("greedy", "lossless greedy decoding",
         unless_lossy(lambda: _check_greedy(table, greedy_parts, settings, names), greedy_only=True)),
        ("sampling", "lossless sampling (exact sequence distribution)",
         unless_lossy(lambda: _check_distribution(table, sampled_parts, settings, names))),
    ]
    report = _run_checks("verifier", name, plugin, checks, only)
    return report.raise_for_failures() if raise_on_failure else report
