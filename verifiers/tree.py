"""Verifying a token tree: greedy (the longest path of argmax tokens) and lossless
multi-candidate speculative sampling.

Sampling is recursive rejection sampling down the tree (Miao et al. 2024, SpecInfer, "multi-step
speculative sampling"; Jeon et al. 2024, "Recursive Speculative Decoding"; Chen et al. 2024,
Sequoia). At a node with target distribution p and children c_1..c_m tried in order:

    accept c_j with probability min(1, p(x_j) / q_j(x_j));
    on rejection p <- norm(max(0, p - q_j)) and try c_{j+1};
    if every child is rejected, the next token is drawn from p (the residual so far).

An accepted child becomes the node, with its own target row. q_j is the distribution child j
was drawn from *given the path and its earlier siblings*: the parent's q for siblings drawn
independently (with replacement), q with the earlier siblings removed and renormalised for
siblings drawn without replacement, one-hot for a deterministic drafter (q=None). Each step is
ordinary speculative sampling of the current residual with proposal q_j, so by induction on the
siblings the token committed after a node follows its target distribution exactly.

Shapes: K nodes, V vocabulary; p (K+1, V): row 0 after the root, row i+1 after node i.
"""

from __future__ import annotations

import torch

from specframe.trees import ROOT, children
from specframe.types import TreeVerdict

from .speculative import one_hot_rows, residual_distribution


def greedy_tree_step(parents, tokens: torch.Tensor, p: torch.Tensor) -> TreeVerdict:
    """Follow the child whose token is the target's argmax while there is one."""
    below = children(parents)
    node, path = ROOT, []
    while True:
        target_token = int(p[node + 1].argmax())
        match = next((child for child in below[node] if int(tokens[child]) == target_token), None)
        if match is None:
            return TreeVerdict(tuple(path), target_token)
        path.append(match)
        node = match


def tree_speculative_step(parents, tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor,
                          uniforms, sample) -> TreeVerdict:
    """Recursive rejection sampling down the tree, with the random draws passed in.

    tokens (K,), q (K, V) or None (one-hot), p (K+1, V); uniforms[n] is the n-th uniform in
    [0, 1) (one per child tried); sample draws one token from a (V,) distribution.
    """
    if q is None:
        q = one_hot_rows(tokens, p.shape[-1]).to(p.dtype)
    below = children(parents)
    node, path, tried = ROOT, [], 0
    while True:
        residual = p[node + 1]
        accepted = None
        for child in below[node]:
            token = int(tokens[child])
            p_token, q_token = float(residual[token]), float(q[child, token])
            accept = q_token > 0 and uniforms[tried] < min(1.0, p_token / q_token)
            tried += 1
            if accept:
                accepted = child
                break
            residual = residual_distribution(residual, q[child])
        if accepted is None:
            return TreeVerdict(tuple(path), sample(residual))
        path.append(accepted)
        node = accepted
