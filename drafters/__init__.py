"""Built-in drafters, registered through the same hook as third-party plugins."""

from specframe.hookspecs import hookimpl

from .draft_model import DraftModelDrafter
from .early_exit import EarlyExitDrafter
from .hybrid import HybridDrafter
from .ngram import NgramDrafter
from .self_exit import SelfExitDrafter


@hookimpl
def register_drafters(register):
    register("ngram", NgramDrafter, "prompt lookup: copy what followed the last n tokens earlier")
    register("draft_model", DraftModelDrafter, "a separate small HF causal LM with the same tokenizer")
    register("self_exit", SelfExitDrafter, "the target's first N layers + its own norm and LM head (untrained)")
    register("early_exit", EarlyExitDrafter, "EESD: the target's first N layers + a trained early-exit head (default)")
    register("hybrid", HybridDrafter, "an n-gram match from the context when there is one, else a model drafter")
