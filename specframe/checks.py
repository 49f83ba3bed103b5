"""Contract checks the engine runs on every part's output before it can change the text."""

from __future__ import annotations

import torch

from .errors import PluginContractError
from .types import Draft, Verdict

Q_SUM_TOLERANCE = 1e-3


def clamp_draft_budget(asked, budget: int, plugin: str) -> int:
    """A controller's max_draft must be an int >= 0; the engine then caps it at `budget`."""
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        raise PluginContractError(plugin, "max_draft() returns an int >= 0", f"got {asked!r}")
    return min(asked, budget)


def check_draft(draft: Draft, budget: int, vocab_size: int, plugin: str) -> None:
    """Shapes, token range and, when given, that q is a distribution the tokens could come from."""
    if not isinstance(draft, Draft):
        raise PluginContractError(plugin, "propose() returns a specframe.Draft", f"got {type(draft).__name__}")
    tokens = draft.tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
        raise PluginContractError(plugin, "draft tokens are a 1-D int64 tensor (K,)", _describe(tokens))
    K = tokens.shape[0]
    if K > budget:
        raise PluginContractError(plugin, "at most max_tokens drafts", f"drafted {K}, asked for at most {budget}")
    if K and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise PluginContractError(plugin, f"draft tokens lie in [0, {vocab_size})", f"got {tokens.tolist()}")
    if draft.q is not None:
        _check_q(draft.q, tokens, vocab_size, plugin)


def _check_q(q, tokens: torch.Tensor, vocab_size: int, plugin: str) -> None:
    K = tokens.shape[0]
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != (K, vocab_size):
        raise PluginContractError(plugin, f"q has shape (K, V) = ({K}, {vocab_size})", _describe(q))
    if not torch.isfinite(q).all() or (q < 0).any():
        raise PluginContractError(plugin, "q holds finite, non-negative probabilities", "found NaN, inf or < 0")
    sums = q.sum(-1)
    if ((sums - 1).abs() > Q_SUM_TOLERANCE).any():
        raise PluginContractError(plugin, "each row of q sums to 1", f"row sums {sums.tolist()}")
    if K and (q[torch.arange(K), tokens] <= 0).any():
        raise PluginContractError(plugin, "each draft token has q > 0 (it was sampled from q)", f"tokens {tokens.tolist()}")


def check_verdict(verdict: Verdict, drafted: int, vocab_size: int, plugin: str) -> None:
    if not isinstance(verdict, Verdict):
        raise PluginContractError(plugin, "verify() returns a specframe.Verdict", f"got {type(verdict).__name__}")
    if verdict.accepted_length > drafted:
        raise PluginContractError(plugin, "accept at most the drafted tokens", f"accepted {verdict.accepted_length} of {drafted}")
    if verdict.next_token >= vocab_size:
        raise PluginContractError(plugin, f"next token lies in [0, {vocab_size})", f"got {verdict.next_token}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"got {type(value).__name__}"
