"""Greedy verification: keep drafts while each equals the target's argmax."""

from __future__ import annotations

from attrs import frozen

from specframe.interfaces import Verifier
from specframe.types import TreeVerdict, Verdict


@frozen
class GreedyVerifier(Verifier):
    """Accept d_i while d_i == argmax p_i; the extra token is argmax p_{a+1}.

    draft_tokens (K,), p (K+1, V). q is ignored. Lossless for greedy decoding only.
    """

    def verify(self, draft_tokens, q, p, sampler) -> Verdict:
        K = draft_tokens.shape[0]
        target_tokens = p.argmax(-1)  # (K+1,)
        mismatches = (draft_tokens != target_tokens[:K]).nonzero()
        accepted_length = int(mismatches[0]) if len(mismatches) else K
        return Verdict(accepted_length, int(target_tokens[accepted_length]))

    def verify_tree(self, draft, p, sampler) -> TreeVerdict:
        """The longest path of the tree whose tokens are the target's argmax; p (K+1, V)."""
        from .tree import greedy_tree_step

        return greedy_tree_step(draft.parents, draft.tokens, p)


