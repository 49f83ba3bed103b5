"""A dynamic draft tree ranked by the drafter's confidence (EAGLE-2, Li et al. 2024).

Each node's *value* is the product of the drafter's probabilities along its path (its chance of
being drafted, an estimate of its chance of being accepted). Depth by depth:

1. every node of the last layer proposes its `width` likeliest children as candidates;
2. the `width` candidates of highest value in the new layer become nodes and are *expanded*:
   run through the target's lower layers (`SplitView.lower_tree`) and the head, with a tree
   mask, in one call for the whole layer, which gives their own children next;
3. stop when the controller says so (`keep_drafting(depth, ...)`) or the node budget is spent.

Then the candidates never expanded, from every depth, fill what is left of the budget in order
of value (the reranking of EAGLE-2: a second choice near the root may beat a deep node). Nodes
are listed layer by layer, then the filled leaves, so parents come first and the expanded nodes
are the prefix of the tree that the target reuses from the lower layers.

The tree is deterministic given the drafter's logits: q=None (one-hot), for greedy decoding and
for sampling alike; the tree verifier's recursive rejection sampling with one-hot q is lossless
(each rejected candidate is removed from p). Shapes: V vocabulary, T nodes of one layer.
"""

from __future__ import annotations

import torch

from specframe.trees import ROOT, tree_attention_mask, tree_positions
from specframe.types import Draft


def draft_dynamic_tree(expand_root, expand, root_token: int, max_tokens: int, width: int, controller,
                       sampler) -> Draft:
    """expand_root(token) -> (V,) logits after the root; expand(tokens, parents) -> (T, V) logits
    after each of T new nodes (their parents index the nodes listed so far, ROOT for the root)."""
    tokens: list[int] = []
    parents: list[int] = []
    confidences: list[float] = []
    candidates: list[tuple[float, int, int, float]] = []  # (value, token, parent, confidence), not yet nodes
    layer = _children(expand_root(root_token), ROOT, 1.0, width, sampler)
    depth = 0
    while layer and len(tokens) < max_tokens:
        layer.sort(key=lambda c: -c[0])
        chosen = layer[: min(width, max_tokens - len(tokens))]
        candidates += layer[len(chosen):]
        first = len(tokens)
        for _, token, parent, confidence in chosen:
            tokens.append(token)
            parents.append(parent)
            confidences.append(confidence)
        depth += 1
        if len(tokens) >= max_tokens or not controller.keep_drafting(depth, max(c[3] for c in chosen)):
            break
        logits = expand(torch.tensor(tokens[first:], dtype=torch.long), tuple(parents[first:]))  # (T, V)
        layer = [child for i, (value, *_) in enumerate(chosen)
                 for child in _children(logits[i], first + i, value, width, sampler)]
    candidates.sort(key=lambda c: -c[0])
    for _, token, parent, confidence in candidates[: max(0, max_tokens - len(tokens))]:
        tokens.append(token)
        parents.append(parent)
        confidences.append(confidence)
    return Draft(torch.tensor(tokens, dtype=torch.long), None, tuple(confidences), parents=tuple(parents))


def _children(logits: torch.Tensor, parent: int, value: float, width: int, sampler) -> list[tuple]:
    """The `width` likeliest children of a node: (value, token, parent, confidence) each.

    Probabilities are the sampler's (temperature, top-k, top-p), plain softmax when greedy; tokens
    the drafter cannot propose (probability 0, or -inf logits) are left out."""
    probs = torch.softmax(logits.float(), -1) if sampler.greedy else sampler.probs(logits[None])[0]  # (V,)
    top = torch.topk(probs, min(width, probs.shape[-1]))
    return [(value * float(p), int(t), parent, float(p)) for p, t in zip(top.values, top.indices) if float(p) > 0]


def head_tree_logits(head, hidden: torch.Tensor, parents: tuple[int, ...], start: int,
                     previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run (T, C) layer-N states of a tree's last T nodes through a head's layers and KV cache,
    each seeing the cache and its ancestors at position start + depth; -> ((T, V) logits, (T, C)
    features after the head's norm). An eagle head also reads `previous` (T, C): each node's
    parent's feature (the head's own prediction inside a tree).

    The head's cache holds the committed tokens up to `start`, the root at `start` and the
    tree's earlier nodes in order, as the target's cache does during a tree pass."""
    T, K = hidden.shape[0], len(parents)
    rows = slice(K + 1 - T, K + 1)  # the new nodes in the scored sequence [root, node 0, ...]
    mask = tree_attention_mask(parents, start, hidden.device)[:, :, rows, : start + K + 1]  # (1, 1, T, S)
    positions = tree_positions(parents, start, hidden.device)[:, rows]  # (1, T)
    if previous is not None:  # an eagle head reads each node's state and its parent's feature
        hidden = head.fused_input(hidden, previous)
    features = head.norm(head.run_cached(hidden, mask, positions))  # (T, C)
    return head.to_full_vocab(head.score(features, extra=True)).float(), features
