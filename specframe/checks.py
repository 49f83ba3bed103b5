"""Contract checks the engine runs on every part's output before it can change the text.

Each check raises `PluginContractError(plugin, rule, detail, part)`: `plugin` is the plugin that
registered the part, `rule` the broken rule in words, `part` the part ("drafter 'ngram'").
The conformance kit (`specframe.testing`) runs the same checks. Shapes: K drafts, V vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import PluginContractError
from .trees import ROOT, path_to
from .types import Draft, TreeVerdict, Verdict, is_int  # noqa: F401 - is_int is part of this module's checks

Q_SUM_TOLERANCE = 1e-3
# The contract's bound on any controller's max_draft(): asking for more drafts in one round is a
# broken controller. (The built-in controllers' own options stop far lower, at 64.)
CONTRACT_MAX_DRAFT = 1024


def check_max_draft(asked, plugin: str, part: str | None = None, limit: int = CONTRACT_MAX_DRAFT) -> int:
    """A controller's max_draft() is an int in [0, limit]; returns it."""
    if not is_int(asked) or not 0 <= asked <= limit:
        raise PluginContractError(plugin, f"max_draft() returns an int in [0, {limit}]",
                                  f"got {asked!r} ({type(asked).__name__})", part)
    return int(asked)


def clamp_draft_budget(asked, budget: int, plugin: str, part: str | None = None) -> int:
    """A controller's max_draft must be an int in [0, CONTRACT_MAX_DRAFT]; the engine caps it at `budget`."""
    return min(check_max_draft(asked, plugin, part), budget)


def check_tree_width(width, plugin: str, part: str | None = None) -> int | None:
    """A controller's tree_width() is None (no plan) or an int in [1, CONTRACT_MAX_DRAFT]; returns it."""
    if width is not None and (not is_int(width) or not 1 <= width <= CONTRACT_MAX_DRAFT):
        raise PluginContractError(plugin, f"tree_width() returns None or an int in [1, {CONTRACT_MAX_DRAFT}]",
                                  f"got {width!r} ({type(width).__name__})", part)
    return None if width is None else int(width)


def check_keep_drafting(keep, plugin: str, part: str | None = None) -> bool:
    """A controller's keep_drafting() returns a bool (Python's or NumPy's); returns it."""
    if not isinstance(keep, (bool, np.bool_)):
        raise PluginContractError(plugin, "keep_drafting() returns a bool", f"got {keep!r} ({type(keep).__name__})",
                                  part)
    return bool(keep)


def check_draft(draft: Draft, budget: int, vocab_size: int, plugin: str, part: str | None = None) -> None:
    """Shapes, token range, confidences and, when given, that q is a distribution the tokens could come from."""
    if not isinstance(draft, Draft):
        raise PluginContractError(plugin, "propose() returns a specframe.Draft", f"got {type(draft).__name__}", part)
    tokens = draft.tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
        raise PluginContractError(plugin, "draft tokens are a 1-D int64 tensor (K,)", _describe(tokens), part)
    K = tokens.shape[0]
    if K > budget:
        raise PluginContractError(plugin, "at most max_tokens drafts", f"drafted {K}, asked for at most {budget}", part)
    if K and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise PluginContractError(plugin, f"draft tokens lie in [0, {vocab_size})", f"got {tokens.tolist()}", part)
    _check_confidences(draft.confidences, K, plugin, part)
    if draft.parents is not None:
        check_parents(draft.parents, K, plugin, part)
    if draft.q is not None:
        _check_q(draft.q, tokens, vocab_size, plugin, part)


def check_parents(parents, K: int, plugin: str, part: str | None = None) -> None:
    """A tree's parents: one int per token, each -1 (the root) or an earlier node's index."""
    rule = "parents hold one int per draft token, each -1 or the index of an earlier token"
    if not isinstance(parents, tuple) or len(parents) != K:
        raise PluginContractError(plugin, rule, f"{K} tokens, parents {parents!r}", part)
    bad = [(i, p) for i, p in enumerate(parents) if not is_int(p) or not ROOT <= p < i]
    if bad:
        where = ", ".join(f"token {i} has parent {p!r}" for i, p in bad)
        raise PluginContractError(plugin, rule, where, part)


def _check_confidences(confidences, K: int, plugin: str, part: str | None) -> None:
    rule = "confidences hold one number in [0, 1] per draft token (or none)"
    try:
        values = [float(c) for c in confidences]
    except (TypeError, ValueError):
        raise PluginContractError(plugin, rule, f"got {confidences!r}", part) from None
    if len(values) not in (0, K) or not all(0.0 <= c <= 1.0 for c in values):  # NaN fails too
        raise PluginContractError(plugin, rule, f"{K} tokens, confidences {values}", part)


def _check_q(q, tokens: torch.Tensor, vocab_size: int, plugin: str, part: str | None) -> None:
    K = tokens.shape[0]
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != (K, vocab_size) or not q.is_floating_point():
        raise PluginContractError(plugin, f"q is a float tensor of shape (K, V) = ({K}, {vocab_size})", _describe(q), part)
    if not torch.isfinite(q).all() or (q < 0).any():
        raise PluginContractError(plugin, "q holds finite, non-negative probabilities", "found NaN, inf or < 0", part)
    sums = q.sum(-1)
    if ((sums - 1).abs() > Q_SUM_TOLERANCE).any():
        raise PluginContractError(plugin, "each row of q sums to 1", f"row sums {sums.tolist()}", part)
    if K and (q[torch.arange(K), tokens.to(q.device)] <= 0).any():
        raise PluginContractError(plugin, "each draft token has q > 0 (it was sampled from q)",
                                  f"tokens {tokens.tolist()}", part)


def check_verdict(verdict: Verdict, drafted: int, vocab_size: int, plugin: str, part: str | None = None,
                  draft_tokens: torch.Tensor | None = None, p: torch.Tensor | None = None) -> None:
    """Ranges and types; with `draft_tokens` and `p` (K+1, V), also that the target can produce
    every token the verdict commits (p > 0), which any lossless verifier guarantees: at
    temperature 0 p is one-hot, so this pins a lossless verdict down exactly."""
    if not isinstance(verdict, Verdict):
        raise PluginContractError(plugin, "verify() returns a specframe.Verdict", f"got {type(verdict).__name__}", part)
    accepted, token = verdict.accepted_length, verdict.next_token
    if not is_int(accepted) or not 0 <= accepted <= drafted:
        raise PluginContractError(plugin, "accept at most the drafted tokens (an int in [0, K])",
                                  f"accepted {accepted!r} of {drafted}", part)
    if not is_int(token) or not 0 <= token < vocab_size:
        raise PluginContractError(plugin, f"next token is an int in [0, {vocab_size})", f"got {token!r}", part)
    if p is None or draft_tokens is None:
        return
    committed = [*draft_tokens[:accepted].tolist(), int(token)]
    impossible = [(i, t) for i, t in enumerate(committed) if not float(p[i, t]) > 0]
    if impossible:
        where = ", ".join(f"token {t} at position {i + 1}" for i, t in impossible)
        raise PluginContractError(plugin, "a lossless verifier commits only tokens the target can produce (p > 0)",
                                  f"{where} has p = 0 (accepted {accepted} of {drafted} drafts)", part)


def check_tree_verdict(verdict: TreeVerdict, draft: Draft, vocab_size: int, plugin: str, part: str | None = None,
                       p: torch.Tensor | None = None) -> None:
    """The path runs down from the root through the tree; with `p` (K+1, V), the target can
    produce every committed token (p > 0), as for a chain."""
    if not isinstance(verdict, TreeVerdict):
        raise PluginContractError(plugin, "verify_tree() returns a specframe.TreeVerdict",
                                  f"got {type(verdict).__name__}", part)
    path, token = verdict.path, verdict.next_token
    K = len(draft)
    if not isinstance(path, tuple) or not all(is_int(n) and 0 <= n < K for n in path) or (
            path and path_to(draft.parents, path[-1]) != list(path)):
        raise PluginContractError(plugin, "the accepted path runs from a child of the root down the tree",
                                  f"path {path!r}, parents {draft.parents}", part)
    if not is_int(token) or not 0 <= token < vocab_size:
        raise PluginContractError(plugin, f"next token is an int in [0, {vocab_size})", f"got {token!r}", part)
    if p is None:
        return
    rows = [0, *(node + 1 for node in path)]  # the row that scored each committed token
    committed = [*(int(draft.tokens[n]) for n in path), int(token)]
    impossible = [(i, t) for i, (row, t) in enumerate(zip(rows, committed)) if not float(p[row, t]) > 0]
    if impossible:
        where = ", ".join(f"token {t} at position {i + 1}" for i, t in impossible)
        raise PluginContractError(plugin, "a lossless verifier commits only tokens the target can produce (p > 0)",
                                  f"{where} has p = 0 (path {path})", part)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"got {type(value).__name__}"
