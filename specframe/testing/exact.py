"""Exact distributions by enumeration: every random draw of a generation branches, the real engine
is replayed along each branch, and the branches' probabilities add up to the exact distribution
of what the engine commits. Nothing is sampled, so a difference of 1e-9 is a real one.

`EnumeratingSampler` stands in for `specframe.sampling.Sampler` (same `probs`, same `greedy`):
- `sample(probs)` branches over every token with probability > 0, with that probability
  (normalised, as `torch.multinomial` does);
- `uniform()` returns a `SymbolicUniform`: each comparison with a number branches into "below"
  and "not below", keeping the interval the draw is known to lie in; a comparison the interval
  already decides does not branch. The probability of a branch is the interval's share.

A replay is deterministic given the branch taken at each draw, so depth-first replays visit each
leaf once. A part that draws randomness elsewhere (torch's global generator, `sampler.generator`,
Python's `random`) or turns a uniform into a number (`float(u)`) cannot be followed:
`NotEnumerable` is raised, because a replay then meets other options at a known branch point.
Shapes: V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch

from ..engine import Parts, generate_tokens
from ..sampling import Sampler, probs_from_logits
from ..target import TargetModel
from ..types import SamplingConfig

MAX_REPLAYS = 20_000  # engine replays one enumeration may take before it gives up


class NotEnumerable(BaseException):
    """The generation cannot be enumerated (the message says why); test it statistically instead.
    A BaseException, so that the engine's fault handling (`except Exception`) lets it through."""


class _Unexplored(BaseException):
    """A draw past the scripted branches. A BaseException, so that the engine's fault handling
    (`except Exception`) lets it through."""

    def __init__(self, probabilities: tuple[float, ...]):
        super().__init__()
        self.probabilities = probabilities


class _Replay:
    """One replay: the branch to take at each draw, and the probability of the path so far."""

    def __init__(self, script: list[int], seen: list[tuple[float, ...]]):
        self.script, self.seen = script, seen  # seen: each scripted draw's options when first met
        self.position, self.weight = 0, 1.0

    def choose(self, probabilities: tuple[float, ...]) -> int:
        """The index of the branch taken among options with these probabilities (all > 0)."""
        if len(probabilities) == 1:
            return 0
        if self.position == len(self.script):
            raise _Unexplored(probabilities)
        if probabilities != self.seen[self.position]:
            raise NotEnumerable(
                f"draw {self.position + 1} of a replay offered {_short(probabilities)} where the first run offered "
                f"{_short(self.seen[self.position])}: a part draws randomness outside the sampler")
        index = self.script[self.position]
        self.position += 1
        self.weight *= probabilities[index]
        return index


class SymbolicUniform:
    """A uniform draw in [0, 1) known only by the interval [low, high) that comparisons left it in.

    Supports `u < t`, `u <= t`, `u > t`, `u >= t` (either side) and scaling by a positive number
    (`u * s < t`); `float(u)` raises `NotEnumerable`.
    """

    def __init__(self, replay: _Replay, low: float = 0.0, high: float = 1.0, scale: float = 1.0, state=None):
        self._replay, self._scale = replay, scale
        self._state = state if state is not None else [low, high]  # shared by scaled views

    def _below(self, threshold) -> bool:
        """u < threshold (u <= threshold has the same probability)."""
        t = float(threshold) / self._scale
        low, high = self._state
        if t <= low:
            return False
        if t >= high:
            return True
        width = high - low
        if self._replay.choose(((t - low) / width, (high - t) / width)) == 0:
            self._state[1] = t
            return True
        self._state[0] = t
        return False

    def __lt__(self, threshold) -> bool:
        return self._below(threshold)

    __le__ = __lt__

    def __gt__(self, threshold) -> bool:
        return not self._below(threshold)

    __ge__ = __gt__

    def __mul__(self, factor) -> "SymbolicUniform":
        factor = float(factor)
        if not factor > 0:
            raise NotEnumerable(f"a uniform draw was multiplied by {factor}; the kit follows positive scaling only")
        return SymbolicUniform(self._replay, scale=self._scale * factor, state=self._state)

    __rmul__ = __mul__

    def __truediv__(self, divisor) -> "SymbolicUniform":
        return self * (1.0 / float(divisor))

    def __float__(self) -> float:
        raise NotEnumerable("a part turned a uniform draw into a number (float(u)); the kit follows comparisons only")

    def __repr__(self) -> str:
        return f"SymbolicUniform(in [{self._state[0]:.4g}, {self._state[1]:.4g}) x {self._scale:.4g})"


class EnumeratingSampler(Sampler):
    """A `Sampler` whose draws branch (see the module docstring). A part that reaches for its
    `generator` to draw by itself raises NotEnumerable."""

    def __init__(self, config: SamplingConfig, replay: _Replay, device: torch.device | str = "cpu"):
        self.config = SamplingConfig(config.temperature, config.top_k, config.top_p, None)
        self._replay = replay

    @property
    def generator(self) -> torch.Generator:
        raise NotEnumerable("a part draws from sampler.generator itself; the kit follows sample() and uniform() only")

    def sample(self, probs: torch.Tensor) -> int:
        if self.greedy:
            return int(probs.argmax())
        weights = probs.detach().double().cpu().flatten()  # (V,)
        tokens = weights.nonzero().flatten().tolist()
        total = float(weights.sum())
        return tokens[self._replay.choose(tuple(float(weights[t]) / total for t in tokens))]

    def uniform(self) -> SymbolicUniform:  # type: ignore[override]
        return SymbolicUniform(self._replay)


def enumerate_outcomes(run: Callable[[EnumeratingSampler], Hashable], config: SamplingConfig,
                       max_replays: int = MAX_REPLAYS, rechecks: int = 3) -> dict:
    """{outcome: probability} of `run(sampler)` over every branch of its draws.

    `run` must build its parts afresh on each call, so that each replay starts from the same state.
    `rechecks` paths are replayed once more at the end: a different outcome means randomness from
    outside the sampler (NotEnumerable), even where it made no branch differ.
    """
    outcomes: dict = {}
    leaves: list[tuple[list[int], list[tuple[float, ...]], Hashable]] = []
    stack: list[tuple[list[int], list[tuple[float, ...]]]] = [([], [])]
    replays = 0
    while stack:
        script, seen = stack.pop()
        replays += 1
        if replays > max_replays:
            raise NotEnumerable(f"more than {max_replays} branches; use a smaller vocabulary, top-k or length")
        replay = _Replay(script, seen)
        try:
            outcome = run(EnumeratingSampler(config, replay))
        except _Unexplored as branch:
            options = branch.probabilities
            stack += [(script + [i], seen + [options]) for i in reversed(range(len(options)))]
            continue
        outcomes[outcome] = outcomes.get(outcome, 0.0) + replay.weight
        if len(leaves) < rechecks:
            leaves.append((script, seen, outcome))
    for script, seen, outcome in leaves:
        again = run(EnumeratingSampler(config, _Replay(script, seen)))
        if again != outcome:
            raise NotEnumerable(f"one path gave {outcome} and then {again}: a part draws randomness outside the sampler")
    total = sum(outcomes.values())
    if abs(total - 1.0) > 1e-9:  # paths that changed between replays (time, outside randomness)
        raise NotEnumerable(f"the branches' probabilities add up to {total!r}, not 1: the replays were not deterministic")
    return outcomes


def engine_distribution(model, make_parts: Callable[[], tuple], prompt: list[int], max_new_tokens: int,
                        config: SamplingConfig, eos_token_ids: Iterable[int] = (), names: dict | None = None,
                        max_replays: int = MAX_REPLAYS) -> dict[tuple[int, ...], float]:
    """The exact distribution of the tokens `specframe.engine.generate_tokens` commits.

    make_parts() -> (drafter, controller, verifier), fresh parts for every replay; drafter None =
    plain decoding.
    """
    target = TargetModel(model)
    eos = set(eos_token_ids)

    def run(sampler: EnumeratingSampler) -> tuple[int, ...]:
        drafter, controller, verifier = make_parts()
        parts = Parts(target, drafter, controller, verifier, dict(names or {}))
        stream = generate_tokens(parts, list(prompt), sampler, max_new_tokens, eos)
        return tuple(token for committed in stream for token in committed)

    return enumerate_outcomes(run, config, max_replays)


@torch.inference_mode()
def autoregressive_distribution(model, prompt: list[int], length: int, config: SamplingConfig,
                                eos_token_ids: Iterable[int] = (), max_outcomes: int = 50_000
                                ) -> dict[tuple[int, ...], float]:
    """P(the next `length` tokens) under plain sampling with `config`: one full forward pass (no
    cache) per prefix, the reference every lossless generation must equal. A sequence ends early
    at an EOS token."""
    device = next(model.parameters()).device
    eos = set(eos_token_ids)
    done: dict[tuple[int, ...], float] = {}
    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, mass in frontier.items():
            logits = model(input_ids=torch.tensor([prompt + list(prefix)], device=device)).logits[0, -1:]
            p = probs_from_logits(logits, config)[0].double().cpu()  # (V,)
            p = p / p.sum()
            for token in p.nonzero().flatten().tolist():
                (done if token in eos else grown)[prefix + (token,)] = mass * float(p[token])
        if len(grown) > max_outcomes:
            raise NotEnumerable(f"more than {max_outcomes} possible sequences; lower the length or set top_k")
        frontier = grown
    return {**done, **frontier}


def largest_difference(got: dict, expected: dict) -> tuple[float, object]:
    """max |got - expected| over all outcomes, and the outcome where it is largest."""
    keys = set(got) | set(expected)
    if not keys:
        return 0.0, None
    worst = max(keys, key=lambda k: abs(got.get(k, 0.0) - expected.get(k, 0.0)))
    return abs(got.get(worst, 0.0) - expected.get(worst, 0.0)), worst


def _short(probabilities: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in probabilities[:6]) + (", ...)" if len(probabilities) > 6 else ")")
