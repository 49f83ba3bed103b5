"""The dtype of a head's matmuls while it trains (`--train-dtype`).

`bf16` runs the head's forward and backward under `torch.autocast(bfloat16)`: its matmuls and
attention read bf16 copies of fp32 weights and activations and accumulate in fp32; its
weights, their gradients, the optimizer state, the norms and the loss stay fp32. On a CPU with
bf16 units (AMX or AVX-512 BF16) a training step is about twice as fast; on a CPU without them
bf16 matmuls are emulated and slower, so `auto` picks bf16 only where the device has the units
(CUDA GPUs that support bf16, and such CPUs). docs/eesd.md "Training speed" has the figures.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

TRAIN_DTYPES = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPU bf16 units


def cpu_has_bf16_units(cpuinfo: str | None = None) -> bool:
    """Whether the CPU lists AMX-BF16 or AVX-512 BF16 among its flags (Linux /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_train_dtype(train_dtype: str, device) -> str:
    """'fp32' or 'bf16': `auto` is bf16 where `device` has bf16 units, else fp32."""
    import torch

    if train_dtype != "auto":
        return train_dtype
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"


def matmul_precision(train_dtype: str, device):
    """A context for a head's forward pass: bf16 autocast for 'bf16', nothing for 'fp32'."""
    import torch

    if train_dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
