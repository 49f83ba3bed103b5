"""The conformance kit: does a drafter, controller or verifier keep specframe's contract, and is
decoding with it still lossless? For plugin authors, from pytest:

    from specframe.testing import check_drafter

    def test_my_drafter_conforms():
        check_drafter("mine")  # raises ConformanceError (an AssertionError) naming what broke

`check_drafter`, `check_controller` and `check_verifier` build the part by its registered name
(from `registry`, by default one that loads every installed plugin), run their checks on tiny
toy models and return a `ConformanceReport`.

Losslessness is computed, not sampled (`specframe.testing.exact`): a sampler that enumerates
branches at every random draw (each token of a categorical draw, each side of each comparison
with a uniform draw), the real engine is replayed along every branch, and the exact probability
of every committed sequence is compared with plain sampling's, to 1e-9 on float64 toy models, in
several sampling settings (T = 1 and T != 1, top-k, top-p) and under adversarial draft lengths.
A part whose randomness does not go through the sampler cannot be enumerated; it is tested by
chi-square instead, and the report says so and states the test's power.

- contract: drafts are (K,) int64 in [0, V) with K <= max_tokens, q rows are distributions,
  confidences lie in [0, 1], drafting stops when the controller says so (drafter); max_draft is
  an int in [0, cap], keep_drafting a bool, update takes any RoundStats (controller); verdicts
  are in range and follow the greedy rule at temperature 0 (verifier). The engine's own checks
  (`specframe.checks`) do the checking.
- q_sampling: at a fixed state, every possible draft chain (or tree) has exactly the probability
  the reported q gives it; a drafter that returns q=None (one-hot) drafts one draft whatever the
  draws; for a tree, each node's q equals its token's exact distribution given the nodes listed
  before it (`specframe.testing.trees`);
- rounds (verifier): one round of K = 1..3 drafts, every draw enumerated, then completed by the
  target, gives exactly the target's joint distribution (Leviathan et al. 2023, Theorem 1);
- rollback: during a generation with random rejections (random accepted paths for a tree), every
  draft (tokens and parents) equals the one a fresh drafter makes from the committed tokens alone;
- greedy: the engine's tokens equal plain greedy decoding (a full forward pass per token);
- sampling: the exact distribution of whole generations through the engine equals plain sampling's.

References: Leviathan et al. 2023 and Chen et al. 2023 (speculative sampling is exact for any
drafter whose q is truthful, so a wrong output distribution means a lying q, a broken verifier
or a broken rollback). Shapes: K drafts, V vocabulary, T tokens.
"""

from .common import KitSettings, generate, plain_greedy, reference_verifier, sample_sequences
from .controllers import check_controller
from .drafters import check_drafter
from .exact import (EnumeratingSampler, NotEnumerable, SymbolicUniform, autoregressive_distribution,
                    engine_distribution, enumerate_outcomes, largest_difference)
from .report import CheckResult, ConformanceError, ConformanceReport
from .stats import ChiSquare, chi_square, chi_square_power
from .toys import VOCAB_SIZE, KitController, ScriptedController, TableDrafter, TableLM, tiny_llama
from .verifiers import check_verifier

__all__ = [
    "check_drafter", "check_controller", "check_verifier", "ConformanceError", "ConformanceReport",
    "CheckResult", "KitSettings", "tiny_llama", "TableLM", "TableDrafter", "KitController", "ScriptedController",
    "EnumeratingSampler", "SymbolicUniform", "NotEnumerable", "enumerate_outcomes", "engine_distribution",
    "autoregressive_distribution", "largest_difference", "sample_sequences", "plain_greedy", "generate",
    "reference_verifier", "chi_square", "chi_square_power", "ChiSquare", "VOCAB_SIZE",
]
