"""The `suffix` drafter: SuffixDecoding (Oliaro et al. 2024, arXiv 2411.04975) for specframe.

Two depth-bounded suffix trees with counts (see `tree.py`):
- the *local* tree indexes this generation's prompt and the tokens committed so far;
- the *corpus* tree indexes the outputs of earlier generations of the same drafter
  (optional, bounded by `max_corpus_tokens`, oldest outputs evicted first).

Each round, in each tree, find the longest suffix of the context (at most `max_match` tokens)
that occurred before and was followed by something. From there, follow the most frequent next
token while the path's empirical probability (the product of `count(child) / count(followed)`)
stays >= `min_prob`, and for at most `spec_factor * match_length + spec_offset` tokens, so that
short, ambiguous matches give short drafts. Of the two candidates, propose the one with the
larger expected number of accepted tokens (the sum of its path probabilities).

Deterministic: q is one-hot (returned as None), so any lossless verifier keeps the output exact.
Per round the drafter only indexes the newly committed tokens: O(max_depth) each.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from attrs import define, field, validators as v

from specframe.interfaces import Drafter
from specframe.types import Draft

from .tree import SuffixTree


@define
class Candidate:
    """A proposed continuation: tokens, the empirical probability of each given the ones before."""

    tokens: list[int]
    probabilities: list[float]
    match_length: int

    @property
    def expected_accepted(self) -> float:
        """Sum over i of P(first i tokens right) under the tree's counts."""
        total, cumulative = 0.0, 1.0
        for p in self.probabilities:
            cumulative *= p
            total += cumulative
        return total


def longest_match(tree: SuffixTree, matches: list[int], min_match: int, max_match: int) -> tuple[int, int | None]:
    """Longest suffix (between min_match and max_match tokens) whose node has a continuation."""
    for length in range(min(len(matches), max_match), min_match - 1, -1):
        if tree.total[matches[length - 1]] > 0:
            return length, matches[length - 1]
    return 0, None


def continuation(tree: SuffixTree, node: int, match_length: int, limit: int, min_prob: float) -> Candidate:
    """Follow the most frequent child while the path's probability stays >= min_prob."""
    tokens, probabilities, cumulative = [], [], 1.0
    while len(tokens) < limit:
        step = tree.next_token(node)
        if step is None:
            break
        token, p = step
        cumulative *= p
        if cumulative < min_prob:
            break
        tokens.append(token)
        probabilities.append(p)
        node = tree.child(node, token)
    return Candidate(tokens, probabilities, match_length)


@define
class SuffixDrafter(Drafter):
    """SuffixDecoding: the most frequent continuation of the longest matching suffix.

    The fields are the options (`--drafter-opt NAME=VALUE` on the CLI).
    """

    max_depth: int = field(default=32, validator=[v.instance_of(int), v.ge(2), v.le(1024)])  # match + draft
    max_match: int | None = field(default=None, validator=v.optional([v.instance_of(int), v.ge(1)]))  # max_depth // 2
    min_match: int = field(default=1, validator=[v.instance_of(int), v.ge(1)])  # shortest suffix to match
    spec_factor: float = field(default=1.0, converter=float, validator=v.ge(0.0))  # draft <= factor * match + offset
    spec_offset: float = field(default=0.0, converter=float, validator=v.ge(0.0))
    min_prob: float = field(default=0.1, converter=float, validator=[v.ge(0.0), v.le(1.0)])  # stop below this
    corpus: bool = field(default=True, validator=v.instance_of(bool))  # also match earlier outputs
    max_corpus_tokens: int = field(default=8192, validator=[v.instance_of(int), v.ge(0)])  # corpus size cap

    local: SuffixTree | None = field(default=None, init=False, repr=False)
    corpus_tree: SuffixTree | None = field(default=None, init=False, repr=False)
    corpus_matches: list[int] = field(factory=list, init=False, repr=False)  # context suffixes in the corpus
    corpus_documents: deque = field(factory=deque, init=False, repr=False)  # for eviction, oldest first
    prompt_length: int = field(default=0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.max_match is None:
            self.max_match = self.max_depth // 2
        if self.max_match >= self.max_depth:
            raise ValueError(f"max_match ({self.max_match}) must be < max_depth ({self.max_depth}), "
                             "so that a match leaves room in the tree for a continuation")
        self.corpus_tree = SuffixTree(self.max_depth)

    # ---- the drafter interface -----------------------------------------------------------------
    def begin(self, target, prompt_ids, sampler) -> None:
        if self.local is not None and self.corpus:
            self.add_to_corpus(self.local.tokens[self.prompt_length :])
        self.local = SuffixTree(self.max_depth)
        self.corpus_matches = []
        self.prompt_length = len(prompt_ids)
        self._ingest(list(prompt_ids))

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        self._sync(context)
        best = self._best_candidate(max_tokens)
        tokens: list[int] = []
        for token in best.tokens:
            tokens.append(token)
            if not controller.keep_drafting(len(tokens), best.probabilities[len(tokens) - 1]):
                break
        return Draft(torch.tensor(tokens, dtype=torch.long), None, tuple(best.probabilities[: len(tokens)]))

    def rollback(self, valid_length: int) -> None:
        if self.local is not None and valid_length < len(self.local.tokens):
            self.local.remove_last(len(self.local.tokens) - valid_length)
            self.corpus_matches = self.corpus_tree.suffix_nodes(self.local.tokens)

    # ---- the corpus of earlier outputs -------------------------------------------------------
    def add_to_corpus(self, token_ids) -> None:
        """Index a token sequence (an earlier output, or any text to draw drafts from)."""
        tokens = [int(t) for t in token_ids]
        if not tokens or self.max_corpus_tokens == 0:
            return
        tokens = tokens[-self.max_corpus_tokens :]
        self.corpus_tree.extend_all(tokens)
        self.corpus_tree.close()
        self.corpus_documents.append(tokens)
        while self.corpus_tree.size > self.max_corpus_tokens:
            self.corpus_tree.remove_document(self.corpus_documents.popleft())
        # evicted nodes may be among the matches: find the context's suffixes again
        self.corpus_matches = self.corpus_tree.suffix_nodes(self.local.tokens) if self.local else []

    # ---- helpers -----------------------------------------------------------------------------
    def _sync(self, context: list[int]) -> None:
        """Index the context tokens not seen yet (and forget any that no longer match)."""
        if self.local is None:
            self.local, self.prompt_length = SuffixTree(self.max_depth), 0
        seen = len(self.local.tokens)
        if seen > len(context) or (seen and context[seen - 1] != self.local.tokens[-1]):
            common = next((i for i, (a, b) in enumerate(zip(self.local.tokens, context)) if a != b),
                          min(seen, len(context)))
            self.rollback(common)
            seen = common
        self._ingest(context[seen:])

    def _ingest(self, tokens: list[int]) -> None:
        for token in tokens:
            token = int(token)
            self.local.extend(token)
            if self.corpus and self.corpus_tree.size:
                self.corpus_matches = self.corpus_tree.follow(self.corpus_matches, token)

    def _best_candidate(self, max_tokens: int) -> Candidate:
        best = Candidate([], [], 0)
        sources = [(self.local, self.local.active)]
        if self.corpus and self.corpus_tree.size:
            sources.append((self.corpus_tree, self.corpus_matches))
        for tree, matches in sources:
            length, node = longest_match(tree, matches, self.min_match, self.max_match)
            if node is None:
                continue
            limit = min(max_tokens, math.floor(self.spec_factor * length + self.spec_offset))
            candidate = continuation(tree, node, length, limit, self.min_prob)
            if candidate.expected_accepted > best.expected_accepted:
                best = candidate
        return best
