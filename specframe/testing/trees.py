"""What the kit checks of tree drafts beyond a chain's: q per node, given the nodes listed before it.

For a chain, q is right when every draft chain has exactly the probability the product of its
q rows gives it (`drafters._exact_q`). A tree needs more: the tree verifier tries the children
of a node in order and needs q[i] to be the distribution node i was drawn from *given its path
and its earlier siblings* (docs/plugins.md, "Tree drafts"). Products alone cannot tell a row
that belongs to one node from a row that belongs to another, so the kit checks each node:

    P(token of node i = x | nodes 0..i-1, and node i's parent) = q[i](x)  for every x,

computed exactly from the enumerated drafts (every draft's exact probability, `exact.py`). A
drafter that lists its nodes in the order it draws them satisfies it; so does one whose nodes
depend on nothing listed before them but their path and earlier siblings. The rows reported for
node i must also be the same in every draft that shares what was listed before it: a row that
depends on later draws is not the distribution the node was drawn from.

Shapes: K nodes, V vocabulary.
"""

from __future__ import annotations

import torch

from ..trees import depths
from .report import CheckFailed

# a draft as the kit keys it: (tokens, parents); parents None for a chain
DraftKey = tuple[tuple[int, ...], "tuple[int, ...] | None"]


def draft_key(draft) -> DraftKey:
    return tuple(draft.tokens.tolist()), (None if draft.parents is None else tuple(draft.parents))


def describe_draft(key: DraftKey) -> str:
    tokens, parents = key
    return f"{list(tokens)}" if parents is None else f"tokens {list(tokens)} with parents {list(parents)}"


def depth_of(draft) -> int:
    """How deep a draft goes: its length for a chain, its deepest node's depth for a tree."""
    return len(draft) if draft.parents is None else max(depths(draft.parents), default=0)


CONFIDENCE_TOLERANCE = 1e-4  # a cached state and a fresh one round differently, by ~1e-6 in float32


def same_confidences(a, b) -> bool:
    """Two drafts report the same confidences (to CONFIDENCE_TOLERANCE)."""
    return len(a.confidences) == len(b.confidences) and all(
        abs(float(x) - float(y)) <= CONFIDENCE_TOLERANCE for x, y in zip(a.confidences, b.confidences))


def check_node_conditionals(drafted: dict[DraftKey, float], rows: dict[DraftKey, torch.Tensor],
                            tolerance: float) -> int:
    """For every tree node, the exact conditional distribution of its token given the nodes listed
    before it (and its parent) equals its q row. `drafted`: each draft's exact probability; `rows`:
    each draft's q (K, V) in float64. Raises CheckFailed on the worst node; returns how many
    (prefix, node) pairs were checked."""
    groups: dict[tuple, list] = {}  # (tokens before, parents up to node i) -> [row, mass per token, total]
    for key, probability in drafted.items():
        tokens, parents = key
        if parents is None or key not in rows:
            continue
        for node in range(len(tokens)):
            prefix = (tokens[:node], parents[: node + 1])
            row = rows[key][node]
            group = groups.setdefault(prefix, [row, torch.zeros_like(row), 0.0])
            if (group[0] - row).abs().max() > tolerance:
                raise CheckFailed(_depends_on_later_draws(node, prefix))
            group[1][tokens[node]] += probability
            group[2] += probability
    for prefix, (row, mass, total) in groups.items():
        conditional = mass / total  # (V,)
        worst = int((conditional - row).abs().argmax())
        if abs(float(conditional[worst] - row[worst])) > tolerance:
            raise CheckFailed(_wrong_row(prefix, worst, float(conditional[worst]), float(row[worst])))
    return len(groups)


def _depends_on_later_draws(node: int, prefix: tuple) -> str:
    tokens, parents = prefix
    return (f"tree node {node} (parent {parents[-1]}) gets different q rows in drafts that agree on every node "
            f"listed before it ({list(tokens)}): its q depends on draws made after it, so it is not the "
            f"distribution the node was drawn from")


def _wrong_row(prefix: tuple, token: int, drawn: float, claimed: float) -> str:
    tokens, parents = prefix
    node = len(tokens)
    return (f"tree node {node} (parent {parents[-1]}, after nodes {list(tokens)}) is token {token} with "
            f"probability {drawn:.10f}, but its q row gives {claimed:.10f} (exact, by enumerating the draws): q[i] "
            f"must be the distribution node i was drawn from given its path and the siblings listed before it")
