"""Compile few_rows.c for this CPU on first use, cache the library, and check it before use.

The library is built with `cc -O3 -march=native` (about a second) and cached under the specframe
cache directory, keyed by its source, compiler, flags and CPU flags, so a later process loads it
at once. There is one library per weight dtype (`KERNEL_DTYPES`): fp32, and bf16 (built with
-DSPECFRAME_BF16, only when a bf16 model asks for it; bf16 weights are widened to fp32 as they are
loaded, so any x86-64 CPU with AVX2 runs it, bf16 units or not). Before it is trusted, its linear
kernel is checked against `F.linear` on every tail case (here) and its decoder layers against a
reference (`specframe.kernels.layers`). Without a C compiler, with SPECFRAME_FEW_ROW_KERNEL=0, or
when a check fails, passes keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

DISABLE_ENV = "SPECFRAME_FEW_ROW_KERNEL"  # "0": PyTorch's kernels (and the packed oneDNN LM head)
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
LINK_FLAGS = ("-lm",)
C_SOURCE = (Path(__file__).parent / "few_rows.c").read_text()
KERNEL_DTYPES = {torch.float32: (), torch.bfloat16: ("-DSPECFRAME_BF16",)}  # weight dtype -> its extra flags


def library(dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The compiled kernels for this CPU and weights of `dtype` (fp32 or bf16), built on first
    use; None where they cannot be had (or for another dtype)."""
    return _library(dtype) if dtype in KERNEL_DTYPES else None


@functools.cache
def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    try:
        return load_library(build_library(compiler, (*CFLAGS, *KERNEL_DTYPES[dtype])), dtype)
    except (OSError, subprocess.SubprocessError, KernelCheckError) as exc:
        said = getattr(exc, "stderr", None) or b""
        detail = f"{exc}: {said.decode(errors='replace').strip()[-500:]}" if said else str(exc)
        name = {torch.float32: "", torch.bfloat16: " for bf16 weights"}[dtype]
        warnings.warn(f"specframe: the few-row kernel{name} is unavailable ({detail}); using PyTorch's kernels",
                      RuntimeWarning, stacklevel=3)
        return None


library.cache_clear = _library.cache_clear  # forget the libraries (tests that change the environment)


class KernelCheckError(RuntimeError):
    """A compiled kernel that gives wrong results (a broken compiler, or a library built for another CPU)."""


def build_library(compiler: str, flags: tuple[str, ...], source: str = C_SOURCE) -> Path:
    """Compile `source` into a shared library, cached by its source, compiler, flags and CPU."""
    key = hashlib.sha256("\0".join([source, compiler, *flags, *LINK_FLAGS, _cpu_identity()]).encode()).hexdigest()[:16]
    directory = _kernel_dir()
    path = directory / f"few_rows-{key}.so"
    if path.exists():
        return path
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        c_file, built = Path(scratch) / "few_rows.c", Path(scratch) / "few_rows.so"
        c_file.write_text(source)
        subprocess.run([compiler, *flags, str(c_file), "-o", str(built), *LINK_FLAGS], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, path)  # atomic: a concurrent process sees no library or a whole one
    return path


def load_library(path: Path, dtype: torch.dtype = torch.float32) -> ctypes.CDLL:
    """Load a library built for weights of `dtype` and check its linear kernel against F.linear
    (of the same weights, widened to fp32) on every tail case, and its rounding against torch's."""
    lib = ctypes.CDLL(str(path))
    weight_bytes = lib.specframe_weight_bytes() if hasattr(lib, "specframe_weight_bytes") else 4  # older: fp32
    if weight_bytes != dtype.itemsize:
        raise KernelCheckError(f"{path.name} was built for {weight_bytes}-byte weights, not {dtype}")
    lib.specframe_few_rows_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
    lib.specframe_few_rows_linear.restype = ctypes.c_int
    lib.specframe_layers.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.specframe_layers.restype = ctypes.c_int
    generator = torch.Generator().manual_seed(0)
    for T, K, N in ((1, 37, 9), (3, 64, 16), (5, 50, 7), (16, 96, 13)):
        x, w = torch.randn(T, K, generator=generator), torch.randn(N, K, generator=generator).to(dtype)
        y, y_threads = torch.empty(T, N), torch.empty(T, N)
        lib.specframe_few_rows_linear(x.data_ptr(), w.data_ptr(), y.data_ptr(), T, K, N, 1)
        lib.specframe_few_rows_linear(x.data_ptr(), w.data_ptr(), y_threads.data_ptr(), T, K, N, 3)
        if not torch.allclose(y, x @ w.float().T, rtol=1e-4, atol=1e-4):
            raise KernelCheckError(f"{path.name} computed a {T}x{K} by {K}x{N} product wrongly")
        if not torch.equal(y, y_threads):
            raise KernelCheckError(f"{path.name} computed a {T}x{K} by {K}x{N} product differently on 3 threads")
    values = rounding_cases()
    if dtype != torch.float32 and not torch.equal(to_weights(lib, values, dtype).view(torch.int16),
                                                  values.to(dtype).view(torch.int16)):
        raise KernelCheckError(f"{path.name} rounds fp32 to {dtype} unlike torch")
    return lib


def to_weights(lib: ctypes.CDLL, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `values` in `dtype` as the library writes its KV cache (its own rounding)."""
    values = values.contiguous()
    out = torch.empty(values.shape, dtype=dtype)
    lib.specframe_to_weights.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    lib.specframe_to_weights(values.data_ptr(), out.data_ptr(), values.numel())
    return out


def rounding_cases() -> torch.Tensor:
    """fp32 values that tell roundings apart: ties to even (up and down), just off the ties,
    the largest finite values, overflow to infinity, subnormals, infinities and NaN."""
    bits = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000, 0x7F7FFFFF, 0x7F7F7FFF,
            0x7F7F8000, 0x00008000, 0x00018000, 0x80010000, 0x7F800000, 0xFF800000, 0x00000000, 0x80000000]
    fixed = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return torch.cat([fixed, torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 100])


def _kernel_dir() -> Path:
    from ..models import cache_dir

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
