"""specframe's few-row kernels for CPU passes over 1-16 tokens, in fp32 and bf16 (bf16 weights and
KV cache widened to fp32 as loaded; a second build of the same C source).

- `build`: compiles few_rows.c for this CPU on first use, caches and checks it;
- `linear`: the few-row linear kernel inside `FewRowKernels` blocks (and the packed oneDNN LM
  head without a compiler);
- `attention`: transformers' SDPA attention, each of a few rows as a one-token pass;
- `layers`: whole Llama decoder layers in one C call per run of layers;
- `threads`: the torch thread count while generating.
"""

from .attention import ATTENTION, MAX_ROWS, TREE_MASK_FLAG, few_row_attention
from .build import C_SOURCE, CFLAGS, DISABLE_ENV, KernelCheckError, build_library, library, load_library
from .layers import CompiledLayers, compiled_layers
from .linear import FewRowKernels, few_rows_linear, pack_for_few_rows
from .threads import THREADS_ENV, ThreadChoice, generation_threads

__all__ = ["ATTENTION", "C_SOURCE", "CFLAGS", "DISABLE_ENV", "MAX_ROWS", "THREADS_ENV", "TREE_MASK_FLAG",
           "CompiledLayers", "FewRowKernels", "KernelCheckError", "build_library", "compiled_layers",
           "few_row_attention", "few_rows_linear", "generation_threads", "library", "load_library",
           "pack_for_few_rows", "ThreadChoice"]
