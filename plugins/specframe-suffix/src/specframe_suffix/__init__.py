"""specframe-suffix: the `suffix` drafter (SuffixDecoding, Oliaro et al. 2024) as a specframe plugin."""

import specframe

from .drafter import SuffixDrafter
from .tree import SuffixTree

__version__ = "0.1.0"
__all__ = ["SuffixDrafter", "SuffixTree"]


@specframe.hookimpl
def register_drafters(register):
    register("suffix", SuffixDrafter, "SuffixDecoding: most frequent continuation of the longest matching suffix")
