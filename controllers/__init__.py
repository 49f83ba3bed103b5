"""Built-in controllers, registered through the same hook as third-party plugins."""

from specframe.hookspecs import hookimpl

from .simple import ConfidenceController, FixedController, HeuristicController


@hookimpl
def register_controllers(register):
    register("fixed", FixedController, "always draft k tokens")
    register("heuristic", HeuristicController, "transformers' schedule: +2 after a full accept, -1 otherwise")
    register("confidence", ConfidenceController, "stop when the drafter's top probability < threshold")
