"""A head's token loss against the target's top-K distribution, computed in row chunks.

Both terms of `--loss` are cross-entropies against a few gathered columns of the head's logits:

    loss = -sum_{n,k} c[n,k] * log q_n(ids[n,k]),   log q_n = log_softmax(logits_n)

with `kl`: c = the target's top-K probabilities renormalised over what the head can express,
times the row's weight (the cross-entropy to p, which is the KL up to a constant), and `ce`:
c = the row's weight at k = 0, the target's argmax. `gathered_cross_entropy` computes it, and
its gradient (sum_k c[n,k]) * q_n - scatter(c[n]), a few dozen rows at a time in fp32 while the
logits stay in their own dtype: the (B, T, R) log-softmax is never stored, which took about half
of an eagle training step (docs/eesd.md "Training speed").

Shapes: B sequences, T positions, R head vocabulary, K teacher top-K, N = B x T rows.
"""

from __future__ import annotations

import torch

ROWS_PER_CHUNK = 64  # 64 x 8192 fp32 logits = 2 MB: one chunk stays in cache


class _GatheredCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, coefficients):
        """(N, R) logits, (N, K) long column ids, (N, K) fp32 coefficients -> () fp32 loss."""
        N = logits.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, N, ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            chunk = logits[rows].float()
            lse[rows] = torch.logsumexp(chunk, -1)
            total -= (coefficients[rows] * (chunk.gather(-1, ids[rows]) - lse[rows, None])).sum()
        ctx.save_for_backward(logits, ids, coefficients, lse)
        return total

    @staticmethod
    def backward(ctx, grad):
        logits, ids, coefficients, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            q = torch.exp(logits[rows].float() - lse[rows, None])  # (n, R) the head's distribution
            q.mul_(coefficients[rows].sum(-1, keepdim=True)).scatter_add_(-1, ids[rows], -coefficients[rows])
            out[rows] = q.mul_(grad)
        return out, None, None


def gathered_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """-sum c[..., k] * log_softmax(logits)[..., ids[..., k]] over every row and k.

    logits (..., R) in any float dtype (the gradient comes back in it); ids (..., K) columns;
    coefficients (..., K), zero where a column must not count.
    """
    R, K = logits.shape[-1], ids.shape[-1]
    return _GatheredCrossEntropy.apply(logits.reshape(-1, R), ids.reshape(-1, K).long(),
                                       coefficients.reshape(-1, K).float())


def distill_loss(logits, ids, logprobs, weights, loss: str):
    """Per-batch loss. logits (B, T, R); ids/logprobs (B, T, K) in head space; weights (B, T).

    kl: cross-entropy of q against the target's top-K distribution renormalised over what the head
    can express (= KL up to a constant), averaged over rows with some such mass; ce:
    cross-entropy to the target's argmax, averaged over rows whose argmax the head can express.
    """
    coefficients = torch.zeros(logprobs.shape, dtype=torch.float32, device=logits.device)
    if "kl" in loss:
        p = torch.softmax(logprobs.float(), -1).nan_to_num(0.0)  # renormalised top-K, rows of -inf -> 0
        w = weights * torch.isfinite(logprobs).any(-1)
        coefficients += p * (w / w.sum().clamp(min=1))[..., None]
    if "ce" in loss:
        w = weights * torch.isfinite(logprobs[..., 0])
        coefficients[..., 0] += w / w.sum().clamp(min=1)
    return gathered_cross_entropy(logits, ids, coefficients)
