"""Token trees: the shape of a tree draft and the attention mask that verifies it in one pass.

A tree of K nodes is given by `parents` (K,): `parents[i]` is the index of node i's parent, -1
for a child of the last committed token (the *root*), and every parent comes before its
children. The chain of K tokens is the tree (-1, 0, ..., K-2).

The target scores the sequence [root, node 0, ..., node K-1] (K+1 tokens): row 0 of its p is
the distribution after the root, row i+1 the distribution after node i's path. In the scored
sequence the root is at index 0 and node i at index i+1.

References: Miao et al. 2024 (SpecInfer, token tree verification); Cai et al. 2024 (Medusa,
tree attention); Li et al. 2024 (EAGLE-2, dynamic draft trees).
"""

from __future__ import annotations

import torch

ROOT = -1  # the parent index of a child of the last committed token


def chain_parents(K: int) -> tuple[int, ...]:
    """The chain of K tokens as a tree: (-1, 0, 1, ..., K-2)."""
    return tuple(range(-1, K - 1))


def depths(parents) -> list[int]:
    """Depth of each node: 1 for a child of the root, its parent's depth + 1 otherwise."""
    result: list[int] = []
    for parent in parents:
        result.append(1 if parent == ROOT else result[parent] + 1)
    return result


def children(parents) -> dict[int, list[int]]:
    """node (ROOT for the root) -> its children in the order they are listed."""
    result: dict[int, list[int]] = {ROOT: []}
    for node, parent in enumerate(parents):
        result.setdefault(parent, []).append(node)
        result.setdefault(node, [])
    return result


def path_to(parents, node: int) -> list[int]:
    """The nodes from the root's child down to `node` (empty for ROOT)."""
    path: list[int] = []
    while node != ROOT:
        path.append(node)
        node = parents[node]
    return path[::-1]


def ancestors_mask(parents) -> torch.Tensor:
    """(K+1, K+1) bool over the scored sequence: row i sees column j when j is i or its ancestor."""
    K = len(parents)
    mask = torch.zeros(K + 1, K + 1, dtype=torch.bool)
    mask[:, 0] = True  # everything descends from the root
    for node, parent in enumerate(parents):
        mask[node + 1] = mask[parent + 1]
        mask[node + 1, node + 1] = True
    return mask


def tree_attention_mask(parents, start: int, device) -> torch.Tensor:
    """(1, 1, K+1, start+K+1) bool: the scored sequence sees all `start` cached tokens and, within
    itself, each token sees only its ancestors and itself."""
    scored = ancestors_mask(parents)
    cached = torch.ones(len(parents) + 1, start, dtype=torch.bool)
    return torch.cat([cached, scored], dim=1).to(device)[None, None]


def tree_positions(parents, start: int, device) -> torch.Tensor:
    """(1, K+1) positions of the scored sequence: the root at `start`, each node at start + depth."""
    return torch.tensor([start, *(start + d for d in depths(parents))], device=device)[None]


def without_replacement_rows(q_parent: torch.Tensor, sibling_tokens: list[int]) -> torch.Tensor:
    """(m, V) the rows q_j for m siblings drawn one after another without replacement from
    q_parent (V,): q_parent with the earlier siblings' tokens removed, renormalised."""
    rows, remaining = [], q_parent.clone()
    for token in sibling_tokens:
        rows.append(remaining / remaining.sum())
        remaining[token] = 0
    return torch.stack(rows)
