"""Few-row linear layers on CPU in fp32 or bf16: a pass over 1-16 tokens reads each weight only once.

A one-token pass of a small model streams every weight from memory once (memory-bound). A
verification pass over t tokens should cost barely more, but PyTorch's fp32 matmul on CPU (MKL)
runs a few rows nearly as slowly as t separate passes: on the default model, the linear layers
of a pass over 4 tokens cost about 1.7 and over 8 tokens about 2.3 one-token passes
(docs/benchmarks.md, "Few-row kernels"). The kernel in few_rows.c multiplies tiles of up to 8
input rows by 3 or 4 weight rows (2 by 4 without AVX-512), so each weight row is loaded once for
all rows of a pass over up to 8 tokens, folds each tile's horizontal sums together, and prefetches
the weight 24 rows ahead into L2 so the loads overlap the arithmetic. It reads the weight where it
is (PyTorch's (N, K) layout): no second copy.

bf16 weights go through the bf16 build of the same kernel (`build.library(torch.bfloat16)`):
each weight is widened to fp32 as it is loaded and the sums are the fp32 build's; the bf16 input
rows are widened to fp32 first and the fp32 result rounded to bf16 (as torch rounds) at the end.

Without the compiled library (`build.library()` None), passes keep PyTorch's kernels, except
that the fp32 LM head of a pass over 2-16 tokens runs through oneDNN on a packed copy of its
weight (`pack_for_few_rows`).

Every output element is summed in the same order whatever the number of rows, so row i of a
pass over t tokens is bitwise the row of a one-token pass: verifying drafts reproduces plain
decoding exactly. Against PyTorch's kernels the results differ only by rounding.

Shapes: T rows (tokens), K input features, N output features.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import build
from .attention import ATTENTION, MAX_ROWS, sdpa_config


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for CPU fp32 or bf16 with at most MAX_ROWS rows, through the compiled kernel on
    torch's number of threads (the result is bitwise the same for any number).

    x: (..., K) with T = x.numel() // K rows, in the weight's dtype; weight: (N, K) contiguous.
    Returns (..., N) in that dtype (bf16: the fp32 sums, bias added, rounded once).
    Callers check `build.library(weight.dtype)` first; this assumes it is there.
    """
    N, K = weight.shape
    rows = x.to(torch.float32).contiguous()  # (T, K) fp32 in memory (x itself when fp32)
    out = rows.new_empty((*x.shape[:-1], N))  # (T, N) in memory
    build.library(weight.dtype).specframe_few_rows_linear(rows.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                                          rows.numel() // K, K, N, torch.get_num_threads())
    if bias is not None:
        out += bias
    return out.to(x.dtype)


class FewRowKernels:
    """A CPU model's few-row paths, inside `with` blocks and only there.

    >>> kernels = FewRowKernels(model)
    >>> with kernels:
    ...     logits = model.lm_head(hidden)  # (T, V) through the kernel when T <= MAX_ROWS

    Inside the block each fp32 or bf16 `nn.Linear` gets an instance `forward` that takes the kernel
    (or, without one, an fp32 model's packed oneDNN LM head), and SDPA attention takes `few_row_attention`. On
    leaving it the model is as it was, so Hugging Face's own `generate` on the same model keeps
    its own kernels. Blocks nest. A layer that already has an instance `forward` (accelerate's
    hooks, say) is left alone.
    """

    def __init__(self, model: torch.nn.Module):
        self._depth = 0
        self._config = sdpa_config(model)
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
                   and m.weight.device.type == "cpu" and m.weight.dtype in build.KERNEL_DTYPES]
        dtypes = {m.weight.dtype for m in linears}
        if dtypes and all(build.library(dtype) is not None for dtype in dtypes):
            self._routes = [(m, functools.partial(_kernel_forward, m)) for m in linears]
            self.path = "compiled few-row kernel"
            return
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        packed = _PackedHead(head) if any(m is head and m.weight.dtype == torch.float32 for m in linears) else None
        self.path = "oneDNN LM head" if packed is not None else "PyTorch"
        self._routes = [(head, packed)] if packed is not None else []

    def __enter__(self) -> "FewRowKernels":
        self._depth += 1
        if self._depth == 1:
            for module, forward in self._routes:
                module.__dict__["forward"] = forward
            if self._config is not None:
                self._config._attn_implementation_internal = ATTENTION
        return self

    def __exit__(self, *exc_info) -> None:
        self._depth -= 1
        if self._depth == 0:
            for module, _ in self._routes:
                module.__dict__.pop("forward", None)
            if self._config is not None:
                self._config._attn_implementation_internal = "sdpa"

    def forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`module(x)` on its few-row path, without entering a block (routing every linear
        costs about a millisecond a pass; the compiled layers need only the LM head routed)."""
        route = next((forward for m, forward in self._routes if m is module), None)
        return route(x) if route is not None and not module._forward_hooks and not module._forward_pre_hooks \
            else module(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the compiled few-row kernel where it applies: the library built, CPU fp32
    or bf16 (x and weight alike), at most MAX_ROWS rows, a contiguous weight, no autograd to
    record and no autocast."""
    if (x.dtype is not weight.dtype or x.dtype not in build.KERNEL_DTYPES or not x.is_cpu or not weight.is_cpu
            or x.numel() > MAX_ROWS * x.shape[-1] or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or torch.is_autocast_enabled("cpu") or build.library(x.dtype) is None):
        return F.linear(x, weight, bias)
    return few_rows_linear(x, weight, bias)


def _kernel_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


class _PackedHead:
    """The LM head's forward for 2-16 rows through oneDNN on a packed copy of its weight, built on
    the first such pass (plain decoding never holds the copy); PyTorch's kernel otherwise."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if 1 < rows <= MAX_ROWS and x.dtype == torch.float32 and self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.head.bias, "none", [], "")
        return F.linear(x, self.head.weight, self.head.bias)

    @functools.cached_property
    def packed(self) -> torch.Tensor | None:
        return pack_for_few_rows(self.head)


def pack_for_few_rows(linear: torch.nn.Linear) -> torch.Tensor | None:
    """oneDNN's packed copy of a CPU fp32 linear layer's weight, or None where that does not apply.

    oneDNN's matmul on a weight packed once reads it once for all of a few rows, where MKL's costs
    nearly as much per row as a matrix-vector product (on an AMD EPYC, the default model's LM head
    took 13 ms for one row and 32 ms for two; docs/benchmarks.md). One-row passes stay on
    PyTorch's kernel, which is faster for one row. The fallback when no kernel can be compiled.
    """
    weight = linear.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (AttributeError, RuntimeError):  # a torch build without the op
        return None


