"""Built-in controllers, registered through the same hook as third-party plugins."""

from specframe.hookspecs import hookimpl

from .simple import ConfidenceController, FixedController, HeuristicController
from .thompson import BetaThompsonController, CalibratedThompsonController, CostAwareThompsonController


@hookimpl
def register_controllers(register):
    register("fixed", FixedController, "always draft k tokens")
    register("heuristic", HeuristicController, "transformers' schedule: +2 after a full accept, -1 otherwise")
    register("confidence", ConfidenceController, "stop when the drafter's top probability < threshold")
    register("thompson", BetaThompsonController, "EESD Beta-TS: draft while a draw from a Beta posterior says so")
    register("thompson_calibrated", CalibratedThompsonController, "EESD Calibration-TS: Beta posterior per confidence bin")
    register("thompson_cost", CostAwareThompsonController, "Thompson-drawn θ, then the most tokens/s draft length")
