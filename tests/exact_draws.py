"""Exact enumeration of a verifier step's random draws, for tests/test_*verifier_exact.py.

The step gets stand-ins for its uniforms and its categorical `sample`: each comparison against a
uniform branches into True (probability t) and False (1 - t), each categorical draw into every
outcome; the step is replayed along every branch. Each uniform must be compared once, as the
verifiers do.
"""

from __future__ import annotations

import pytest


class _Branch(Exception):
    """Raised at the first draw beyond the scripted choices."""


class _Script:
    """Replays a list of choices; records the probability of the path taken."""

    def __init__(self, choices):
        self.choices, self.position, self.probability, self.options = list(choices), 0, 1.0, None

    def take(self, options):  # options: list of (value, probability)
        if self.position == len(self.choices):
            self.options = options
            raise _Branch
        value, probability = options[self.choices[self.position]]
        self.position += 1
        self.probability *= probability
        return value


class _Uniform:
    def __init__(self, script):
        self.script = script

    def __lt__(self, threshold):
        t = float(threshold)
        return self.script.take([(True, t), (False, 1.0 - t)])


class _Uniforms:
    """uniforms[i] for any i: every comparison branches."""

    def __init__(self, script):
        self.uniform = _Uniform(script)

    def __getitem__(self, index):
        return self.uniform


def enumerate_outcomes(step) -> dict:
    """{outcome: exact probability} of `step(uniforms, sample)` over every branch of its draws."""
    outcomes, stack = {}, [[]]
    while stack:
        choices = stack.pop()
        script = _Script(choices)
        sample = lambda dist: script.take([(i, float(x)) for i, x in enumerate(dist)])  # noqa: E731
        try:
            outcome = step(_Uniforms(script), sample)
        except _Branch:
            stack += [choices + [i] for i, (_, prob) in enumerate(script.options) if prob > 0]
            continue
        outcomes[outcome] = outcomes.get(outcome, 0.0) + script.probability
    return outcomes


def complete(joint, prefix, weight, p_of, length):
    """Add to `joint` every continuation of `prefix` to `length` tokens, weighted by the target's p."""
    if len(prefix) == length:
        joint[prefix] = joint.get(prefix, 0.0) + weight
        return
    for token, prob in enumerate(p_of(prefix).tolist()):
        if prob > 0:
            complete(joint, prefix + (token,), weight * prob, p_of, length)


def target_joint(p_of, length):
    """The target's own distribution over sequences of `length` tokens."""
    joint = {}
    complete(joint, (), 1.0, p_of, length)
    return joint


def assert_same(a, b):
    for key in set(a) | set(b):
        assert a.get(key, 0.0) == pytest.approx(b.get(key, 0.0), abs=1e-9), key
