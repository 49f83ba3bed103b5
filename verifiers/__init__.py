"""Built-in verifiers, registered through the same hook as third-party plugins."""

from specframe.hookspecs import hookimpl

from .greedy import GreedyVerifier
from .speculative import AutoVerifier, SpeculativeSamplingVerifier


@hookimpl
def register_verifiers(register):
    register("greedy", GreedyVerifier, "accept while each draft equals the target's argmax")
    register("speculative", SpeculativeSamplingVerifier, "rejection sampling (Leviathan et al. 2023)")
    register("auto", AutoVerifier, "greedy at temperature 0, else speculative")
