"""Tests of the `suffix` drafter: the tree against brute force, the drafting rule, the corpus,
rollback, options, and the specframe conformance kit."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from specframe.errors import ConfigError
from specframe.plugins import PluginRegistry
from specframe.sampling import Sampler
from specframe.testing import KitController, check_drafter
from specframe.types import SamplingConfig
from specframe_suffix import SuffixDrafter, SuffixTree

GREEDY = Sampler(SamplingConfig(0.0))


def brute_counts(documents: list[list[int]], depth: int) -> Counter:
    counts: Counter = Counter()
    for tokens in documents:
        for start in range(len(tokens)):
            for length in range(1, depth + 1):
                if start + length <= len(tokens):
                    counts[tuple(tokens[start : start + length])] += 1
    return counts


def tree_counts(tree: SuffixTree) -> Counter:
    """Every node's substring and count, checking totals and most-frequent children on the way."""
    counts: Counter = Counter()

    def visit(node, path):
        kids = tree.children[node] or {}
        assert tree.total[node] == sum(tree.count[c] for c in kids.values())
        if kids:
            assert tree.count[kids[tree.best[node]]] == max(tree.count[c] for c in kids.values())
        for token, child in kids.items():
            counts[path + (token,)] = tree.count[child]
            visit(child, path + (token,))

    visit(0, ())
    return counts


@pytest.mark.parametrize("seed", range(40))
def test_tree_matches_brute_force_through_extend_remove_and_documents(seed):
    rng = random.Random(seed)
    depth = rng.randint(2, 6)
    tree = SuffixTree(depth)
    tokens = [rng.randint(0, 3) for _ in range(rng.randint(1, 30))]
    tree.extend_all(tokens)
    assert tree_counts(tree) == brute_counts([tokens], depth)
    removed = rng.randint(0, len(tokens))
    tree.remove_last(removed)
    kept = tokens[: len(tokens) - removed]
    assert tree_counts(tree) == brute_counts([kept], depth)
    assert tree.active == tree.suffix_nodes(kept)
    tree.close()
    other = [rng.randint(0, 3) for _ in range(8)]
    tree.extend_all(other)
    tree.close()
    assert tree_counts(tree) == brute_counts([kept, other], depth)
    tree.remove_document(other)
    assert tree_counts(tree) == brute_counts([kept], depth)
    assert tree.size == len(kept)
    tree.extend_all(other)  # reuses the freed nodes
    assert tree_counts(tree) == brute_counts([kept, other], depth)


def propose(drafter: SuffixDrafter, context: list[int], max_tokens: int = 8, controller=None):
    return drafter.propose(context, max_tokens, controller or KitController(max_tokens), GREEDY)


def test_proposes_the_most_frequent_continuation_of_the_longest_match():
    drafter = SuffixDrafter(corpus=False)
    context = [1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 3, 7, 1, 2]
    drafter.begin(None, context[:-1], GREEDY)
    draft = propose(drafter, context)
    # "1 2" is the longest suffix seen before; 3 always followed it, then 9 twice and 7 once.
    # The match has 2 tokens, so with spec_factor 1 the draft has at most 2.
    assert draft.tokens.tolist() == [3, 9]
    assert draft.q is None
    assert draft.confidences == pytest.approx((1.0, 2 / 3))


def test_draft_length_follows_match_length_and_confidence():
    context = [5, 6, 7, 8, 9, 10, 11, 4, 5, 6, 7, 8]
    long_match = SuffixDrafter(corpus=False)
    long_match.begin(None, context, GREEDY)
    assert propose(long_match, context, 8).tokens.tolist() == [9, 10, 11, 4]  # match "5 6 7 8": up to 4
    factor = SuffixDrafter(corpus=False, spec_factor=0.5)
    factor.begin(None, context, GREEDY)
    assert propose(factor, context, 8).tokens.tolist() == [9, 10]
    ambiguous = [1, 2, 1, 3, 1, 4, 1, 5, 1]  # after 1: 2, 3, 4 or 5, each 1/4
    strict = SuffixDrafter(corpus=False, min_prob=0.3)
    strict.begin(None, ambiguous, GREEDY)
    assert len(propose(strict, ambiguous)) == 0
    lenient = SuffixDrafter(corpus=False, min_prob=0.2)
    lenient.begin(None, ambiguous, GREEDY)
    assert propose(lenient, ambiguous).tokens.tolist() == [5]  # ties go to the most recent


def test_stops_when_the_controller_says_so():
    context = [5, 6, 7, 8, 9, 10, 11, 4, 5, 6, 7, 8]
    drafter = SuffixDrafter(corpus=False)
    drafter.begin(None, context, GREEDY)
    assert len(propose(drafter, context, 8, KitController(8, stop_after=2))) == 2


def test_earlier_outputs_become_a_corpus_for_later_generations():
    drafter = SuffixDrafter()
    answer = [20, 21, 22, 23, 24, 25, 26, 27]
    drafter.begin(None, [1, 2, 3], GREEDY)
    propose(drafter, [1, 2, 3, *answer])  # the engine shows the drafter the committed tokens
    drafter.begin(None, [4, 5, 6], GREEDY)  # a new generation: the old answer joins the corpus
    assert propose(drafter, [4, 5, 6, 20, 21, 22]).tokens.tolist() == [23, 24, 25]
    no_corpus = SuffixDrafter(corpus=False)
    no_corpus.begin(None, [1, 2, 3], GREEDY)
    propose(no_corpus, [1, 2, 3, *answer])
    no_corpus.begin(None, [4, 5, 6], GREEDY)
    assert len(propose(no_corpus, [4, 5, 6, 20, 21, 22])) == 0


def test_the_corpus_evicts_its_oldest_outputs():
    drafter = SuffixDrafter(max_corpus_tokens=10)
    drafter.add_to_corpus([30, 31, 32, 33, 34, 35])
    drafter.add_to_corpus([40, 41, 42, 43, 44, 45])  # 12 > 10 tokens: the first output goes
    assert drafter.corpus_tree.size == 6
    drafter.begin(None, [30, 31, 32], GREEDY)
    assert len(propose(drafter, [30, 31, 32, 33])) == 0
    drafter.begin(None, [40, 41, 42], GREEDY)
    assert propose(drafter, [40, 41, 42, 43]).tokens.tolist() == [44, 45]


def test_rollback_forgets_rejected_tokens():
    rng = random.Random(0)
    tokens = [rng.randint(0, 5) for _ in range(60)]
    drafter = SuffixDrafter(corpus=False, max_depth=8, max_match=4)
    drafter.begin(None, tokens[:20], GREEDY)
    propose(drafter, tokens[:50])
    drafter.rollback(30)
    rolled_back = propose(drafter, tokens[:30] + [7, 7, 7])
    fresh = SuffixDrafter(corpus=False, max_depth=8, max_match=4)
    fresh.begin(None, tokens[:20], GREEDY)
    assert rolled_back.tokens.tolist() == propose(fresh, tokens[:30] + [7, 7, 7]).tokens.tolist()
    assert drafter.local.tokens == tokens[:30] + [7, 7, 7]


def test_a_context_that_is_not_an_extension_is_resynchronised():
    drafter = SuffixDrafter(corpus=False)
    drafter.begin(None, [1, 2, 3, 1, 2], GREEDY)
    propose(drafter, [1, 2, 3, 1, 2, 3, 1, 2])
    propose(drafter, [1, 2, 3, 1, 2, 9, 9])  # tokens 5.. changed without a rollback
    assert drafter.local.tokens == [1, 2, 3, 1, 2, 9, 9]


def test_registered_through_its_entry_point_with_string_options():
    registry = PluginRegistry(autoload=True)
    assert registry.plugins["suffix"].status == "ok"
    drafter = registry.create("drafter", "suffix", {"max_depth": "32", "min_prob": "0.2", "corpus": "false"})
    assert (drafter.max_depth, drafter.max_match, drafter.min_prob, drafter.corpus) == (32, 16, 0.2, False)
    with pytest.raises(ConfigError, match="max_match"):
        registry.create("drafter", "suffix", {"max_depth": "8", "max_match": "8"})


def test_passes_the_specframe_conformance_kit():
    check_drafter("suffix", PluginRegistry(autoload=True))


def test_keeps_its_state_consistent_with_long_drafts_and_no_corpus():
    options = {"corpus": False, "min_prob": 0.0, "spec_factor": 4.0, "max_depth": 6}
    check_drafter("suffix", PluginRegistry(autoload=True), options=options, only=("contract", "rollback", "greedy"))
