"""Few-row linear layers on CPU in fp32: a pass over 1-16 tokens reads each weight only once.

A one-token pass of a small model streams every weight from memory once (memory-bound). A
verification pass over t tokens should cost barely more, but PyTorch's fp32 matmul on CPU (MKL)
runs a few rows nearly as slowly as t separate passes: on the default model, the linear layers
of a pass over 4 tokens cost about 1.7 and over 8 tokens about 2.3 one-token passes
(docs/benchmarks.md, "Few-row kernels"). The kernel here multiplies up to 4 input rows by 4
weight rows at a time, so each weight row is loaded once for all rows, and prefetches the weight
block two tiles ahead so the loads overlap the arithmetic. It reads the weight where it is
(PyTorch's (N, K) layout): no second copy.

The kernel is a small C file compiled on first use for this CPU (`cc -O3 -march=native`, well
under a second) and cached under the specframe cache directory. Without a C compiler, or with
SPECFRAME_FEW_ROW_KERNEL=0, passes keep PyTorch's kernels, except that the LM head of a pass
over 2-16 tokens runs through oneDNN on a packed copy of its weight (`pack_for_few_rows`).

Every output element is summed in the same order whatever the number of rows, so row i of a
pass over t tokens is bitwise the row of a one-token pass: verifying drafts reproduces plain
decoding exactly. Against PyTorch's kernels the results differ only by rounding.

Shapes: T rows (tokens), K input features, N output features.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Generator, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # passes over more rows (prefill) keep PyTorch's GEMM, which is faster there
DISABLE_ENV = "SPECFRAME_FEW_ROW_KERNEL"  # "0": PyTorch's kernels (and the packed oneDNN LM head)
THREADS_ENV = "SPECFRAME_THREADS"  # torch threads while generating on CPU: unset = 1, N, or "torch"
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC")

# y[T, N] = x[T, K] @ w[N, K]^T in fp32. `tile` computes tb (<= TB) input rows against NB weight
# rows; TB and the vector width follow the registers of the ISA the compiler targets.
C_SOURCE = r"""
#include <stddef.h>
#if defined(__AVX512F__)
#define VL 16
#define TB 4
#else
#define VL 8
#define TB 2
#endif
#define NB 4
#define PF 2 /* prefetch the weight block this many tiles ahead */
typedef float vec __attribute__((vector_size(VL * 4)));
typedef float half __attribute__((vector_size(VL * 2)));

static inline vec loadu(const float *p) { vec v; __builtin_memcpy(&v, p, sizeof v); return v; }

static inline float hsum(vec v) { /* a tree of adds, not a chain of VL dependent ones */
    half lo, hi; __builtin_memcpy(&lo, &v, sizeof lo); __builtin_memcpy(&hi, (char *)&v + sizeof lo, sizeof hi);
    half s = lo + hi;
    float r[VL / 2]; __builtin_memcpy(r, &s, sizeof r);
    for (int width = VL / 4; width > 0; width /= 2)
        for (int i = 0; i < width; i++) r[i] += r[i + width];
    return r[0];
}

static inline __attribute__((always_inline)) void tile(const float *x, const float *w, float *y,
                                                         const int tb, int K, int N, const float *pf) {
    vec acc[TB][NB];
    for (int i = 0; i < tb; i++) for (int j = 0; j < NB; j++) acc[i][j] = (vec){0};
    int k = 0;
    for (; k + VL <= K; k += VL) {
        if (pf) for (int line = 0; line < NB * VL; line += 16) __builtin_prefetch(pf + NB * (size_t)k + line, 0, 3);
        vec w0 = loadu(w + k), w1 = loadu(w + K + k), w2 = loadu(w + 2 * (size_t)K + k), w3 = loadu(w + 3 * (size_t)K + k);
        for (int i = 0; i < tb; i++) {
            vec xv = loadu(x + (size_t)i * K + k);
            acc[i][0] += xv * w0; acc[i][1] += xv * w1; acc[i][2] += xv * w2; acc[i][3] += xv * w3;
        }
    }
    for (int i = 0; i < tb; i++)
        for (int j = 0; j < NB; j++) {
            float s = hsum(acc[i][j]);
            for (int kk = k; kk < K; kk++) s += x[(size_t)i * K + kk] * w[(size_t)j * K + kk];
            y[(size_t)i * N + j] = s;
        }
}

static void tiles(const float *x, const float *w, float *y, int T, int K, int N, const float *pf) {
    int t = 0;
    for (; t + TB <= T; t += TB, pf = NULL) tile(x + (size_t)t * K, w, y + (size_t)t * N, TB, K, N, pf);
    switch (T - t) { /* constant tb, so the accumulators stay in registers */
#if TB > 3
        case 3: tile(x + (size_t)t * K, w, y + (size_t)t * N, 3, K, N, pf); break;
        case 2: tile(x + (size_t)t * K, w, y + (size_t)t * N, 2, K, N, pf); break;
#endif
        case 1: tile(x + (size_t)t * K, w, y + (size_t)t * N, 1, K, N, pf); break;
    }
}

static void last_rows(const float *x, const float *w, float *y, int T, int K, int N, int rows) {
    for (int t = 0; t < T; t++)
        for (int j = 0; j < rows; j++) { /* the same order of sums as tile() */
            vec acc = (vec){0};
            int k = 0;
            for (; k + VL <= K; k += VL) acc += loadu(x + (size_t)t * K + k) * loadu(w + (size_t)j * K + k);
            float s = hsum(acc);
            for (; k < K; k++) s += x[(size_t)t * K + k] * w[(size_t)j * K + k];
            y[(size_t)t * N + j] = s;
        }
}

int specframe_few_rows_linear(const float *x, const float *w, float *y, int T, int K, int N) {
    int n = 0;
    for (; n + NB <= N; n += NB) {
        const float *ahead = n + (PF + 1) * NB <= N ? w + (size_t)(n + PF * NB) * K : NULL;
        tiles(x, w + (size_t)n * K, y + n, T, K, N, ahead);
    }
    if (n < N) last_rows(x, w + (size_t)n * K, y + n, T, K, N, N - n);
    return 0;
}
"""


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for CPU fp32 with at most MAX_ROWS rows, through the compiled kernel.

    x: (..., K) with T = x.numel() // K rows; weight: (N, K) contiguous. Returns (..., N).
    Callers check `library()` first; this assumes it is there.
    """
    N, K = weight.shape
    x = x.contiguous()  # (T, K) in memory
    out = x.new_empty((*x.shape[:-1], N))  # (T, N) in memory
    library().specframe_few_rows_linear(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // K, K, N)
    if bias is not None:
        out += bias
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel for this CPU, built on first use; None where it cannot be had."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    try:
        return load_library(build_library(compiler, CFLAGS))
    except (OSError, subprocess.SubprocessError, KernelCheckError) as exc:
        warnings.warn(f"specframe: the few-row kernel is unavailable ({exc}); using PyTorch's kernels",
                      RuntimeWarning, stacklevel=2)
        return None


class KernelCheckError(RuntimeError):
    """A compiled kernel that gives wrong results (a broken compiler, or a library built for another CPU)."""


def build_library(compiler: str, flags: tuple[str, ...], source: str = C_SOURCE) -> Path:
    """Compile `source` into a shared library, cached by its source, compiler, flags and CPU."""
    key = hashlib.sha256("\0".join([source, compiler, *flags, _cpu_identity()]).encode()).hexdigest()[:16]
    directory = _kernel_dir()
    path = directory / f"few_rows-{key}.so"
    if path.exists():
        return path
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        c_file, built = Path(scratch) / "few_rows.c", Path(scratch) / "few_rows.so"
        c_file.write_text(source)
        subprocess.run([compiler, *flags, str(c_file), "-o", str(built)], check=True, capture_output=True, timeout=120)
        os.replace(built, path)  # atomic: a concurrent process sees no library or a whole one
    return path


def load_library(path: Path) -> ctypes.CDLL:
    """Load a built kernel and check it against F.linear on every tail case before trusting it."""
    lib = ctypes.CDLL(str(path))
    lib.specframe_few_rows_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
    lib.specframe_few_rows_linear.restype = ctypes.c_int
    generator = torch.Generator().manual_seed(0)
    for T, K, N in ((1, 37, 9), (3, 64, 16), (5, 50, 7), (16, 96, 13)):
        x, w = torch.randn(T, K, generator=generator), torch.randn(N, K, generator=generator)
        y = torch.empty(T, N)
        lib.specframe_few_rows_linear(x.data_ptr(), w.data_ptr(), y.data_ptr(), T, K, N)
        if not torch.allclose(y, x @ w.T, rtol=1e-4, atol=1e-4):
            raise KernelCheckError(f"{path.name} computed a {T}x{K} by {K}x{N} product wrongly")
    return lib


def _kernel_dir() -> Path:
    from .models import cache_dir

    directory = cache_dir() / "kernels"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="specframe-kernels-"))  # a read-only cache: build for this process


def _cpu_identity() -> str:
    """-march=native code runs only on CPUs like this one: key the cache by what the CPU offers."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), text[:4096])
    except OSError:
        import platform

        return platform.processor() + platform.machine()


class FewRowKernels:
    """A CPU model's few-row paths, inside `with` blocks and only there.

    >>> kernels = FewRowKernels(model)
    >>> with kernels:
    ...     logits = model.lm_head(hidden)  # (T, V) through the kernel when T <= MAX_ROWS

    Inside the block each fp32 `nn.Linear` gets an instance `forward` that takes the kernel (or,
    without one, the packed oneDNN LM head), and SDPA attention takes `few_row_attention`. On
    leaving it the model is as it was, so Hugging Face's own `generate` on the same model keeps
    its own kernels. Blocks nest. A layer that already has an instance `forward` (accelerate's
    hooks, say) is left alone.
    """

    def __init__(self, model: torch.nn.Module):
        self._depth = 0
        self._config = _sdpa_config(model)
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
                   and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
        if library() is not None:
            self._routes = [(m, functools.partial(_kernel_forward, m)) for m in linears]
            self.path = "compiled few-row kernel" if self._routes else "PyTorch"
            return
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        packed = _PackedHead(head) if any(m is head for m in linears) else None
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


def _sdpa_config(model: torch.nn.Module):
    """The config whose attention implementation a pass switches to few_row_attention, or None
    (not a CPU model on transformers' SDPA attention)."""
    config = model.config.get_text_config() if hasattr(model, "config") else None
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if config is None or getattr(config, "_attn_implementation_internal", None) != "sdpa" or not on_cpu:
        return None
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, few_row_attention)
    return config


def _kernel_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    if (torch.get_num_threads() != 1 or x.dtype is not torch.float32 or weight.dtype is not torch.float32 or not x.is_cpu
            or x.numel() > MAX_ROWS * x.shape[-1] or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, bias)
    return few_rows_linear(x, weight, bias)


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


def generation_threads(steps: Generator, device) -> Generator:
    """Run a generation's steps with torch's CPU threads at `threads_for_generation()`, and give
    the caller back its own setting between steps (while it consumes a token) and after.

    Why one thread by default: each multi-threaded operator is an OpenMP parallel region whose
    end waits for every thread. When another process keeps a core busy, the thread on that core
    runs only when the scheduler lets it, and every region waits for it (measured in
    docs/benchmarks.md, "Few-row kernels"). A decoding
    round is many short regions, so the cost grows with their number, not with the work. A small
    model's pass is bound by memory bandwidth, which a second thread barely raises, and the
    few-row kernel runs on one thread.
    """
    threads = threads_for_generation(device)
    try:
        while True:
            with _torch_threads(threads):
                try:
                    item = next(steps)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        with _torch_threads(threads):
            steps.close()  # the engine's own cleanup, when the caller stops early


def threads_for_generation(device) -> int | None:
    """Threads for generating on `device`: 1 on CPU, or SPECFRAME_THREADS (N, or "torch" for
    torch's own setting); None leaves the setting alone."""
    from .errors import ConfigError

    value = os.environ.get(THREADS_ENV, "1").strip().lower()
    if torch.device(device).type != "cpu" or value == "torch":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{THREADS_ENV} must be a whole number >= 1 or 'torch', got {value!r}")
    return int(value)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
