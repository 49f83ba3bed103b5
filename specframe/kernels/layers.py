"""Whole Llama decoder layers for a pass over 1-16 tokens, one C call per run of layers.

A one-token fp32 pass of the default model spends about a third of its time outside the
linear layers: Python, and the many small operators of 30 layers (RMSNorm, RoPE, the cache
write, SDPA, SiLU, residuals). `specframe_layers` in few_rows.c does all of a layer in C:
RMSNorm, q/k/v through the few-row linear kernel, RoPE (with the cos/sin transformers' rotary
embedding computed for the pass), the new keys and values written into the target's KV cache
buffers in place, each row's attention over the cache (causal within the new rows, or a token
tree's mask), o-proj and residual, RMSNorm, gate/up, SiLU times up, down and residual.

Each row is computed by the same code whatever the number of rows, so a verification pass gives
bitwise the rows of one-token passes. Against transformers' layers the results differ only by
fp32 rounding. Before a model uses the compiled layers, they are checked once per process
against transformers' own on a small random Llama (`_checked`).

bf16 models take the same path through a second build of few_rows.c (`build.library(bf16)`):
bf16 weights and KV cache buffers (the same buffers PyTorch's prefills write), widened to fp32
as they are loaded, with every sum computed and accumulated in fp32 as in the fp32 build.
Activations stay fp32 inside the call; the states come in and go out in bf16, and the C code
rounds keys and values to bf16 as it caches them and the residual stream at each layer's end
(to nearest even, as torch does), so a split stack (EESD's lower and upper layers) gives the
states of one call. The rows are then bitwise those of one-token passes in bf16 too: greedy
speculative decoding gives plain decoding's tokens. The bf16 check is against a float64 forward of
the same bf16 weights: the compiled layers must be at least as close to it as transformers'
bf16 layers are.

Only Llama layers (`LlamaDecoderLayer`: no biases, SiLU, no hooks) in fp32 or bf16 on CPU;
anything else, prefills over more than MAX_ROWS tokens, and SPECFRAME_FEW_ROW_KERNEL=0 keep the
PyTorch path of `TargetModel._run_layers`. A draft head's own copies of the target's layers, with
their own KV cache, take the same path (`compiled_stack`, used by `specframe.heads`).
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import torch

from . import build
from .attention import MAX_ROWS

_TABLE_COLUMNS = ("input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down", "keys", "values", "capacity")


class _Dims(ctypes.Structure):
    _fields_ = [("C", ctypes.c_int), ("H", ctypes.c_int), ("Hkv", ctypes.c_int), ("D", ctypes.c_int),
                ("I", ctypes.c_int), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class CompiledLayers:
    """The compiled path of a Llama model's decoder layers (`compiled_layers(model)` makes one), or
    of a stack of such layers outside a model (`compiled_stack(layers)`)."""

    def __init__(self, model_or_layers, lib: ctypes.CDLL):
        layers = _stack_of(model_or_layers)
        attention = layers[0].self_attn
        config = attention.config
        self._lib = lib
        self.dtype = layers[0].self_attn.q_proj.weight.dtype  # of the weights and KV cache: fp32 or bf16
        self._heads, self._kv_heads = config.num_attention_heads, config.num_key_value_heads
        self._head_dim = attention.head_dim
        self._dims = _Dims(config.hidden_size, self._heads, self._kv_heads, self._head_dim,
                           config.intermediate_size, layers[0].input_layernorm.variance_epsilon, attention.scaling)
        self._weights = [_layer_weights(layer) for layer in layers]  # each (9,) tensors, C's order
        self._layers = list(layers)

    def hooked(self) -> bool:
        """Whether a forward hook now sits on a decoder layer (or on every module)."""
        from torch.nn.modules import module

        return bool(module._global_forward_hooks or module._global_forward_pre_hooks) or any(
            _live_hooks(layer) for layer in self._layers)

    def run(self, hidden: torch.Tensor, first: int, last: int, start: int, cache, rope: tuple[torch.Tensor, ...],
            mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run (T, C) states at positions start.. through layers [first, last); return the (T, C) result.

        Keys and values go into `cache` (a `specframe.target.KVCache` whose layers hold `start`
        tokens). rope: transformers' (cos, sin), each (1, T, D). mask: None (causal) or a token
        tree's (1, 1, T, start + T) bool mask. hidden, and the result, are in the weights' dtype.
        """
        T = hidden.shape[0]
        end = start + T
        prototype = hidden.new_empty(1, self._kv_heads, 0, self._head_dim, dtype=self.dtype)
        table = torch.empty(last - first, len(_TABLE_COLUMNS), dtype=torch.int64)  # the C struct array
        rows = []
        for index in range(first, last):
            assert cache.length(index) == start, f"layer {index} caches {cache.length(index)} tokens, not {start}"
            keys, values = cache.make_room(index, end, prototype)
            assert keys.dtype == values.dtype == self.dtype, f"layer {index} caches {keys.dtype}, not {self.dtype}"
            rows.append([w.data_ptr() for w in self._weights[index]] + [keys.data_ptr(), values.data_ptr(),
                                                                        keys.shape[2]])
        table[:] = torch.tensor(rows, dtype=torch.int64)
        x = hidden.to(torch.float32, copy=True).contiguous()  # (T, C) fp32, updated in place by the C call
        cos, sin = (part[0].to(torch.float32).contiguous() for part in rope)
        tree = None if mask is None else mask[0, 0].to(torch.uint8).contiguous()
        status = self._lib.specframe_layers(ctypes.byref(self._dims), table.data_ptr(), last - first, x.data_ptr(),
                                            T, start, cos.data_ptr(), sin.data_ptr(),
                                            None if tree is None else tree.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"the compiled decoder layers could not allocate scratch memory (status {status})")
        for index in range(first, last):
            cache.lengths[index] = end
        return x.to(hidden.dtype)  # exact: in bf16 the C code rounded each layer's output


def compiled_layers(model) -> CompiledLayers | None:
    """The compiled path for `model`'s decoder layers, or None where it does not apply (see the
    module's docstring) or its check against transformers failed."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return compiled_stack(layers) if layers else None


def compiled_stack(layers) -> CompiledLayers | None:
    """The compiled path for a sequence of Llama decoder layers kept outside a model (a draft
    head's, run over its own KVCache with `run(hidden, 0, len(layers), ...)`), or None where it
    does not apply. Its weights are the layers' tensors when called: a caller that may replace
    them (`module.to(dtype)`) makes a new one."""
    if not _is_plain_llama(layers):
        return None
    dtype = layers[0].self_attn.q_proj.weight.dtype
    lib = build.library(dtype)
    if lib is None or not _checked(lib, dtype):
        return None
    return CompiledLayers(layers, lib)


def runs(layers: CompiledLayers | None, hidden: torch.Tensor) -> bool:
    """Whether a pass over `hidden` (T, C) takes the compiled layers: not when a hook was put on
    a decoder layer since (it expects the layer's own forward to run)."""
    return (layers is not None and hidden.shape[0] <= MAX_ROWS and hidden.dtype == layers.dtype and hidden.is_cpu
            and not torch.is_grad_enabled() and not layers.hooked())


def _layer_weights(layer) -> list[torch.Tensor]:
    attention, mlp = layer.self_attn, layer.mlp
    return [layer.input_layernorm.weight, attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight,
            attention.o_proj.weight, layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
            mlp.down_proj.weight]


def _stack_of(model_or_layers) -> list:
    """A model's decoder layers, or the given sequence of layers."""
    inner = getattr(model_or_layers, "model", None)
    return list(inner.layers if inner is not None else model_or_layers)


def _live_hooks(module) -> list:
    """The forward hooks on `module` that could act on its output. Not counted: transformers'
    output-capturing hooks, which it installs for good on the first call with
    `output_hidden_states=True` and which do nothing outside such a call."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [hook for hook in hooks if not (_is_output_capturing(hook) and not _capturing())]


def _is_output_capturing(hook) -> bool:
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _capturing() -> bool:
    """Whether a transformers call is collecting outputs now (True where that cannot be told)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return True
    return _active_collector.get() is not None


def _is_plain_llama(layers) -> bool:
    """Llama decoder layers as transformers writes them, in fp32 or bf16 (all weights alike) on CPU,
    with nothing hooked in."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    if not layers or not all(type(layer) is LlamaDecoderLayer for layer in layers):
        return False
    config = layers[0].self_attn.config
    if config.hidden_act not in ("silu", "swish") or getattr(config, "pretraining_tp", 1) != 1:
        return False
    modules = [m for layer in layers for m in layer.modules()]
    if any("forward" in vars(m) or _live_hooks(m) for m in modules):
        return False
    linears = [m for m in modules if isinstance(m, torch.nn.Linear)]
    norms = [layer.input_layernorm for layer in layers] + [layer.post_attention_layernorm for layer in layers]
    weights = [w for layer in layers for w in _layer_weights(layer)]
    return (all(m.bias is None for m in linears) and all(type(n) is LlamaRMSNorm for n in norms)
            and weights[0].dtype in build.KERNEL_DTYPES
            and all(w.device.type == "cpu" and w.dtype == weights[0].dtype and w.is_contiguous() for w in weights))


@functools.cache
def _checked(lib: ctypes.CDLL, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled layers of `lib` (weights of `dtype`) pass `_layer_check_error`. Warns
    and returns False if not."""
    error = _layer_check_error(lib, dtype)
    if error is not None:
        warnings.warn(f"specframe: the compiled decoder layers are unavailable ({error}); using PyTorch's layers",
                      RuntimeWarning, stacklevel=3)
    return error is None


def _layer_check_error(lib: ctypes.CDLL, dtype: torch.dtype = torch.float32) -> str | None:
    """What is wrong with the compiled layers on a small random Llama in `dtype` (None: nothing),
    over a pass over 2 tokens then a tree-masked pass over 3 (a causal mask given as a tree's).

    fp32: within 1e-4 of transformers' fp32 layers. bf16: at least as close (root mean square
    error) to a float64 forward of the same bf16 weights as transformers' bf16 layers are (both
    round their output to bf16; the compiled layers also the keys, values and each layer's
    output, transformers every step).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval().to(dtype)
    hidden = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    got, expected = _compiled_check_pass(model, lib, hidden), _transformers_pass(model, hidden)
    if dtype == torch.float32:
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
            return f"largest difference {(got - expected).abs().max().item():.2e} from transformers' layers"
        return None
    exact = _transformers_pass(model.double(), hidden.double())
    ours, theirs = ((result.double() - exact).square().mean().sqrt().item() for result in (got, expected))
    if not ours <= theirs:
        return (f"{dtype}: root mean square difference {ours:.2e} from a float64 forward of the same weights, "
                f"against {theirs:.2e} for transformers' layers")
    return None


def _transformers_pass(model, hidden: torch.Tensor) -> torch.Tensor:
    """transformers' decoder layers over (S, C) states at positions 0.., causal -> (S, C)."""
    S = hidden.shape[0]
    with torch.inference_mode():
        positions = torch.arange(S)[None]
        rope = model.model.rotary_emb(hidden[None], position_ids=positions)
        mask = (torch.arange(S)[None, :] <= torch.arange(S)[:, None])[None, None]
        x = hidden[None]
        for layer in model.model.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    return x[0]


def _compiled_check_pass(model, lib: ctypes.CDLL, hidden: torch.Tensor) -> torch.Tensor:
    """The compiled layers over (S, C) states: the first 2, then the rest with a causal mask given
    as a token tree's -> (S, C)."""
    from ..target import KVCache

    S = hidden.shape[0]
    with torch.inference_mode():
        rope = model.model.rotary_emb(hidden[None], position_ids=torch.arange(S)[None])
        mask = (torch.arange(S)[None, :] <= torch.arange(S)[:, None])[None, None]
        compiled, cache, layers = CompiledLayers(model, lib), KVCache(), len(model.model.layers)
        head = compiled.run(hidden[:2], 0, layers, 0, cache, tuple(part[:, :2] for part in rope))
        tail = compiled.run(hidden[2:], 0, layers, 2, cache, tuple(part[:, 2:] for part in rope), mask[:, :, 2:])
    return torch.cat([head, tail])
