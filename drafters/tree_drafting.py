"""Drafting a fixed-shape tree with a one-token-per-call drafter: a chain of the drafter's best
tokens, and beside each of them the next `width - 1` candidates as leaves.

    root -> c1 -> c2 -> c3          (the chain: each node the child of the one before)
       \\-> a1    \\-> a2    \\-> a3   (alternatives: siblings of the chain node at their depth)

Only the chain is run through the drafter, so a tree costs the drafter no more than the chain; the
alternatives are checked by the target in the same verification pass. Nodes are listed chain
first (0..K-1), then the alternatives depth by depth, so the chain heads the tree.

Greedy: the chain takes the argmax and the alternatives the next ranks (q None, deterministic).
Sampling: the chain token is drawn from q, the alternatives after it without replacement, and
each alternative's q row is q without the siblings drawn before it (what the tree verifier needs).
"""

from __future__ import annotations

import torch

from specframe.trees import without_replacement_rows
from specframe.types import Draft


def draft_tree_with(step, first_token: int, max_tokens: int, width: int, controller, sampler) -> Draft:
    """Run `step(token) -> (V,) logits` along the chain; at most `max_tokens` nodes in all."""
    chain, chain_q, confidences, alternatives = [], [], [], []  # alternatives: (depth, token, q row, confidence)
    token, depth_budget = first_token, max(1, max_tokens // width)
    while len(chain) < depth_budget:
        logits = step(token)  # (V,)
        q = sampler.probs(logits[None])[0]  # (V,)
        siblings = _siblings(logits, q, width, sampler)
        rows = None if sampler.greedy else without_replacement_rows(q, siblings)
        shown = torch.softmax(logits.float(), -1) if sampler.greedy else q  # confidence as draft_with has it
        depth = len(chain)
        chain.append(siblings[0])
        chain_q.append(q)
        confidences.append(float(shown[siblings[0]]))
        alternatives += [(depth, t, None if rows is None else rows[j + 1], float(shown[t]))
                         for j, t in enumerate(siblings[1:])]
        token = siblings[0]
        if not controller.keep_drafting(len(chain), confidences[-1]):
            break
    alternatives = alternatives[: max(0, max_tokens - len(chain))]
    parents = (*range(-1, len(chain) - 1), *(depth - 1 for depth, *_ in alternatives))
    tokens = torch.tensor([*chain, *(t for _, t, _, _ in alternatives)], dtype=torch.long)
    q = None if sampler.greedy else torch.stack([*chain_q, *(row for _, _, row, _ in alternatives)])
    return Draft(tokens, q, (*confidences, *(c for *_, c in alternatives)), parents=parents)


def planned_width(controller, default: int, widest: int) -> int:
    """The width the controller plans for this round (its optional `tree_width()`), else `default`;
    at most `widest`."""
    plan = getattr(controller, "tree_width", None)
    width = plan() if plan is not None else None
    return default if width is None else max(1, min(int(width), widest))


def _siblings(logits: torch.Tensor, q: torch.Tensor, width: int, sampler) -> list[int]:
    """The chain token first, then up to width - 1 alternatives the drafter can propose."""
    if sampler.greedy:  # ranks of the logits; tokens at -inf (outside a reduced vocabulary) never
        ranked = torch.argsort(logits.float(), descending=True, stable=True)[:width]
        return [int(t) for t in ranked if torch.isfinite(logits[t])] or [int(ranked[0])]
    drawn, remaining = [], q.clone()
    while len(drawn) < width and float(remaining.sum()) > 0:
        token = sampler.sample(remaining / remaining.sum())
        drawn.append(token)
        remaining[token] = 0
    return drawn
