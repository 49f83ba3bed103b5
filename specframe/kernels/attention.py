"""transformers' SDPA attention for a few new tokens, each row attended as a one-token pass would.

The PyTorch path of a pass (models the compiled layers of `specframe.kernels.layers` do not
cover) switches the model's attention to this function inside `FewRowKernels` blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # passes over more rows (prefill) keep PyTorch's GEMM, which is faster there
ATTENTION = "specframe_few_rows"  # the name few_row_attention is registered under in transformers
_PLAIN_ATTENTION_ARGUMENTS = {"position_ids", "use_cache", "cache", "is_causal", "output_attentions"}
TREE_MASK_FLAG = "specframe_tree_mask"  # passed by a tree pass: its mask is not causal, read it


def few_row_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with each of a few new tokens attended as a one-token pass would.

    query (B, H, T, D); key, value (B, Hkv, S, D), the new tokens last; attention_mask None or
    (B, 1, T, S) bool, causal (a token tree's mask when TREE_MASK_FLAG is passed: each row then
    attends to the keys its mask row marks). For 1 < T <= MAX_ROWS every query row runs the call a one-token pass
    makes (no mask, the GQA flag, the keys up to its own position), so a verification pass gives
    bitwise the rows of one-token passes, and no key or value is copied: transformers, given a
    mask, repeats every key and value head H / Hkv times first (its GQA flag is kept for mask-free
    calls, for CUDA's sake). Other shapes take transformers' own path.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tree = kwargs.pop(TREE_MASK_FLAG, False)  # a token tree: row i sees the keys its mask row marks
    B, H, T, D = query.shape
    plain = all(name in _PLAIN_ATTENTION_ARGUMENTS or value is None for name, value in kwargs.items())
    if not 1 < T <= MAX_ROWS or dropout or B != 1 or not plain:  # sliding windows, soft caps, sinks...
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    S = key.shape[2]
    gqa = {"enable_gqa": True} if key.shape[1] != H else {}
    if tree:  # the keys of the cache, the row's ancestors and itself, in order: as a pass over its path
        seen = [attention_mask[0, 0, i].nonzero().flatten() for i in range(T)]
        rows = [F.scaled_dot_product_attention(query[:, :, i : i + 1], key[:, :, keys], value[:, :, keys],
                                               scale=scaling, **gqa) for i, keys in enumerate(seen)]
    else:
        rows = [F.scaled_dot_product_attention(query[:, :, i : i + 1], key[:, :, : S - T + i + 1],
                                               value[:, :, : S - T + i + 1], scale=scaling, **gqa)
                for i in range(T)]  # T x (B, H, 1, D)
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None  # (B, T, H, D)


def sdpa_config(model: torch.nn.Module):
    """The config whose attention implementation a pass switches to few_row_attention, or None
    (not a CPU model on transformers' SDPA attention)."""
    config = model.config.get_text_config() if hasattr(model, "config") else None
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if config is None or getattr(config, "_attn_implementation_internal", None) != "sdpa" or not on_cpu:
        return None
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, few_row_attention)
    return config


