"""What a round of speculation earns, from per-token acceptance and relative costs (pure math).

A round drafts k tokens and verifies them in one target pass over k + 1 tokens; with each draft
accepted with probability a, independently, it commits E_a(k) = 1 + a + … + a^k tokens.
Used by `thompson_cost` (which draft length to choose) and `specframe costs` (break-even).
"""

from __future__ import annotations

from collections.abc import Sequence


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one round commits with k drafts, each accepted with probability `acceptance`:
    1 + a + … + a^k (the accepted drafts and the target's own token)."""
    return float(k + 1) if acceptance >= 1.0 else (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def break_even(k: int, cost: float) -> float | None:
    """Per-token acceptance at which a round of k drafts commits `cost` tokens (None: never)."""
    if expected_tokens(1.0, k) < cost:
        return None
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_tokens(mid, k) < cost else (low, mid)
    return round(high, 3)


def best_length(theta: float, seconds: Sequence[float], min_k: int = 0) -> int:
    """The k in [min_k, len(seconds) - 1] with the most expected tokens per second, where
    seconds[k] is a round's cost when drafting k. Ties go to the shorter draft."""
    best_k, best_rate = min_k, -1.0
    for k in range(min_k, len(seconds)):
        rate = expected_tokens(theta, k) / seconds[k]
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


def summarize(ms: dict, sizes: list[int]) -> dict:
    """Relative costs from median milliseconds (`ms[t]` per pass over t tokens, `ms["draft"]` per
    draft step), and for each draft length k the round's cost, break-even and best speedup."""
    one = ms[1]
    relative = {t: ms[t] / one for t in sizes}
    draft = ms["draft"] / one if "draft" in ms else None
    rows = []
    for t in sizes[1:]:
        k = t - 1
        cost = relative[t] + k * (draft or 0.0)
        rows.append({"draft_length": k, "round_cost": round(cost, 3), "best_speedup": round(t / cost, 3),
                     "break_even_acceptance": break_even(k, cost)})
    return {"forward_ms": {str(t): round(ms[t], 2) for t in sizes},
            "relative": {str(t): round(relative[t], 3) for t in sizes},
            "draft_step_ms": round(ms["draft"], 2) if draft is not None else None,
            "draft_step_over_forward": round(draft, 3) if draft is not None else None,
            "draft_lengths": rows}


def expected_tree_tokens(theta: float, rescue: float, k: int) -> float:
    """Tokens one round commits with a fixed tree of depth k: a chain of k drafts, each accepted
    with probability θ, and beside each chain draft other candidates (leaves) of which one is
    accepted with probability `rescue` when the chain's draft is rejected:
    E_θ(k) + rescue · (1 − θ^k)  (the chain fails at some depth with probability 1 − θ^k)."""
    return expected_tokens(theta, k) + rescue * (1.0 - theta**k)


def best_tree_shape(theta: float, rescues: dict[int, float], draft_step: float, verify: Sequence[float],
                    min_k: int, max_k: int) -> tuple[int, int]:
    """The (depth k, width W) with the most expected tokens per second, for k in [min_k, max_k]
    and W = 1 (a chain) or a key of `rescues` (W -> the rescue probability of W - 1 candidates
    beside each chain draft). A round costs draft_step · k + verify[k · W] (verify[n]: seconds
    to verify n drafted nodes); shapes with k · W past the end of `verify` are not considered.
    Ties go to the narrower, then the shallower shape."""
    best, best_rate = (min_k, 1), -1.0
    for width in (1, *sorted(w for w in rescues if w > 1)):
        rescue = rescues.get(width, 0.0) if width > 1 else 0.0
        for k in range(min_k, max_k + 1):
            if k * width >= len(verify):
                break
            rate = expected_tree_tokens(theta, rescue, k) / (draft_step * k + verify[k * width])
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = (k, width), rate
    return best
