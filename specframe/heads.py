"""The early-exit draft head of EESD (Liu et al. 2024, arXiv 2406.03853), and how it is stored.

The head reads the target's hidden state after its first N layers and predicts the next token:
one decoder layer (the target's own decoder-layer class and config, initialised from the
target's layer N), an RMSNorm, and the target's frozen tied LM head, optionally restricted to a
reduced vocabulary (the most frequent tokens of the target's own outputs). With a reduced
vocabulary, q is still a distribution over the full vocabulary, zero outside the subset, so
verification against the full-vocabulary p stays lossless.

The head keeps its own KV cache, rolled back with the target's. While drafting on CPU in fp32 or
bf16, its layers run through the target's compiled decoder layers (`specframe.kernels.layers`)
and its LM head through the few-row linear kernel, as the target's own passes do; elsewhere
(other dtypes or decoder layers, SPECFRAME_FEW_ROW_KERNEL=0, training) through PyTorch.

A saved head is one safetensors file whose metadata say which model it belongs to (a
fingerprint: config summary, a hash of some weights and a small probe of weight values), N, the
training command, data, seed and measured acceptance. Loading it on another model raises
`ModelMismatchError`. Shapes: T new positions, S cached positions, C hidden size, V vocabulary,
R reduced vocabulary.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import ModelMismatchError, SpecframeError
from .kernels.linear import linear as few_row_or_torch_linear
from .kernels.layers import CompiledLayers, compiled_stack, runs
from .target import causal_mask

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "heads"
NORM_INIT_SCALE = 0.25  # the head's norm starts as the target's final norm times this
_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta")


class HeadFileError(SpecframeError):
    """A head file that is missing, truncated, corrupt, or not a specframe head."""


# ---- fingerprint ------------------------------------------------------------------------------
def _probe_tensors(model) -> list[torch.Tensor]:
    inner = model.model
    return [inner.embed_tokens.weight, inner.layers[0].self_attn.q_proj.weight,
            inner.layers[-1].mlp.down_proj.weight, inner.norm.weight]


def model_fingerprint(model) -> dict:
    """What identifies a model: config summary, sha256 of some weights (in bf16), a value probe.

    The hash is taken in bf16 so the same model loaded in fp32 or bf16 matches; the probe (64
    weight values) is compared with a tolerance so a fp16 copy matches too.
    """
    config = model.config.get_text_config()
    summary = {key: getattr(config, key, None) for key in _CONFIG_KEYS}
    summary["rope_theta"] = summary["rope_theta"] or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    digest = hashlib.sha256()
    probe = []
    for tensor in _probe_tensors(model):
        flat = tensor.detach().reshape(-1)
        digest.update(flat[: 1 << 16].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        picks = torch.arange(16) * (flat.numel() - 1) // 15
        probe += [round(float(x), 5) for x in flat[picks].float().cpu()]
    return {"config": summary, "weights_sha256": digest.hexdigest(), "probe": probe}


def fingerprint_mismatch(expected: dict, actual: dict) -> str | None:
    """Why two fingerprints differ (None when they match)."""
    differing = [k for k in expected.get("config", {}) if expected["config"].get(k) != actual["config"].get(k)]
    if differing:
        details = ", ".join(f"{k}: head {expected['config'][k]!r} vs model {actual['config'].get(k)!r}" for k in differing)
        return f"the configs differ ({details})"
    if expected.get("weights_sha256") == actual.get("weights_sha256"):
        return None
    a, b = torch.tensor(expected.get("probe", [])), torch.tensor(actual.get("probe", []))
    if a.shape == b.shape and a.numel() and torch.allclose(a, b, rtol=2e-2, atol=2e-3):
        return None
    return "the same architecture but different weights"


def fingerprint_of(model_or_target) -> dict:
    model = getattr(model_or_target, "model", model_or_target) if _is_target(model_or_target) else model_or_target
    return model_fingerprint(model)


def _is_target(obj) -> bool:
    return hasattr(obj, "enable_split") and hasattr(obj, "model")


def _hf_model(model_or_target):
    return model_or_target.model if _is_target(model_or_target) else model_or_target


# ---- the head ---------------------------------------------------------------------------------
class EarlyExitHead(nn.Module):
    """Decoder layer(s) + RMSNorm + the target's frozen LM head, on the target's layer-N states.

    `forward(hidden)` is the teacher-forced training path: (B, T, C) -> (B, T, R) logits over the
    head's vocabulary. `extend(hidden)` is the drafting path with the head's own KV cache:
    (T, C) new positions -> (T, R) logits; `rollback(length)` forgets positions >= length.
    `vocab_ids` (R,) maps the head's vocabulary to the target's; None means the full vocabulary.
    """

    def __init__(self, target_model, exit_layer: int, num_layers: int = 1, vocab_ids: torch.Tensor | None = None,
                 metadata: dict | None = None):
        super().__init__()
        model = _hf_model(target_model)
        inner = model.model
        total = len(inner.layers)
        if not 1 <= exit_layer <= total - num_layers:
            raise SpecframeError(f"exit layer must be in [1, {total - num_layers}] for a {total}-layer model "
                                 f"and a {num_layers}-layer head, got {exit_layer}")
        self.exit_layer, self.num_layers = exit_layer, num_layers
        self.layers = nn.ModuleList(copy.deepcopy(inner.layers[exit_layer + i]) for i in range(num_layers))
        for index, layer in enumerate(self.layers):  # the head's cache has its own layer numbers
            layer.self_attn.layer_idx = index
        self.norm = copy.deepcopy(inner.norm)
        with torch.no_grad():  # soft first logits: on SmolLM2 at N=6, KL 6.6 nats instead of 15.8
            self.norm.weight.mul_(NORM_INIT_SCALE)
        self.rotary = copy.deepcopy(inner.rotary_emb)
        self.full_vocab_size = model.get_output_embeddings().weight.shape[0]
        self.register_buffer("vocab_ids", None if vocab_ids is None else vocab_ids.long().clone(), persistent=False)
        # frozen and shared with the target: a plain attribute, so not a parameter of the head
        object.__setattr__(self, "_lm_weight", model.get_output_embeddings().weight)
        self.metadata = dict(metadata or {})
        self.fingerprint = model_fingerprint(model)
        self.requires_grad_(True)
        self._layer_parameters = list(self.layers.parameters())
        self._compiled, self._compiled_key = None, None  # compiled_layers()
        self.reset_cache()
        self.reset_context_vocab()

    # ---- projection ---------------------------------------------------------------------------
    def frozen_lm_weight(self) -> torch.Tensor:
        """(V, C) the target's frozen LM head in this head's dtype and device.

        Drafting heads share the target's dtype, so this is the target's own tensor; a head that
        trains in fp32 on a bf16 target gets one fp32 copy, made on first use and kept.
        """
        weight = self._lm_weight.detach()
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        if weight.dtype == dtype and weight.device == device:
            return weight
        key = (weight.data_ptr(), dtype, device)
        if getattr(self, "_cast_key", None) != key:
            self._cast_weight, self._cast_key = weight.to(device, dtype), key
        return self._cast_weight

    def lm_weight(self) -> torch.Tensor:
        """(R, C) rows of the frozen tied LM head that this head scores, in the head's dtype."""
        weight = self.frozen_lm_weight()
        if self.vocab_ids is None:
            return weight
        key = (self.vocab_ids.data_ptr(), self.vocab_ids.numel(), weight.device, weight.dtype)
        if getattr(self, "_reduced_key", None) != key:
            self._reduced_weight = weight[self.vocab_ids.to(weight.device)].contiguous()
            self._reduced_key = key
        return self._reduced_weight

    def project(self, x: torch.Tensor, extra: bool = False) -> torch.Tensor:
        """(..., C) layer output -> (..., R) logits, or (..., R + E) with the context tokens."""
        return self.score(self.norm(x), extra)

    def score(self, x: torch.Tensor, extra: bool = False) -> torch.Tensor:
        """(..., C) normed features -> (..., R) logits, or (..., R + E) with the context tokens."""
        logits = few_row_or_torch_linear(x, self.lm_weight())
        if extra and self._extra_weight is not None:
            logits = torch.cat([logits, few_row_or_torch_linear(x, self._extra_weight)], -1)
        return logits

    # ---- context tokens: a reduced vocabulary grows with the tokens of the context ----------
    def reset_context_vocab(self) -> None:
        self._extra_ids: list[int] = []
        self._extra_weight: torch.Tensor | None = None
        self._drafting_ids: torch.Tensor | None = None

    def add_context_vocab(self, token_ids) -> None:
        """Let drafts also be tokens of the context (prompt and output) outside the reduced vocabulary.

        About half of the target's tokens outside an 8k vocabulary were copied from the context.
        q stays a distribution over the full vocabulary, so verification stays lossless.
        """
        if self.vocab_ids is None:
            return
        if not hasattr(self, "_base_set") or self._base_key != self.vocab_ids.data_ptr():
            self._base_set, self._base_key = set(self.vocab_ids.tolist()), self.vocab_ids.data_ptr()
        known = self._base_set.union(self._extra_ids)
        new = [t for t in dict.fromkeys(int(t) for t in token_ids) if t not in known and 0 <= t < self.full_vocab_size]
        if not new:
            return
        weight = self.frozen_lm_weight()
        rows = weight[torch.tensor(new, device=weight.device)]
        self._extra_weight = rows if self._extra_weight is None else torch.cat([self._extra_weight, rows])
        self._extra_ids += new
        self._drafting_ids = None

    def drafting_ids(self) -> torch.Tensor:
        """(R + E,) target ids of the columns `extend` returns."""
        if self._drafting_ids is None:
            self._drafting_ids = torch.cat([self.vocab_ids.cpu(), torch.tensor(self._extra_ids, dtype=torch.long)])
        return self._drafting_ids

    def to_full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, R [+ E]) -> (T, V) logits with -inf outside the head's vocabulary (q is zero there)."""
        if self.vocab_ids is None:
            return logits
        ids = self.vocab_ids if logits.shape[-1] == self.vocab_ids.numel() else self.drafting_ids()
        full = logits.new_full((logits.shape[0], self.full_vocab_size), float("-inf"))
        full[:, ids.to(logits.device)] = logits
        return full

    # ---- teacher-forced training --------------------------------------------------------------
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) layer-N states of right-padded sequences -> (B, T, R) logits."""
        return self.project(self.body(hidden))

    def body(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) layer-N states -> (B, T, C) head-layer outputs (before the norm), teacher-forced."""
        B, T, C = hidden.shape
        position_ids = torch.arange(T, device=hidden.device)[None].expand(B, T)
        rope = self.rotary(hidden, position_ids=position_ids)
        mask = causal_mask(T, 0, hidden.device)
        x = hidden
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rope,
                      cache=None, use_cache=False)
        return x

    # ---- drafting with a KV cache -------------------------------------------------------------
    def reset_cache(self) -> None:
        from .target import KVCache

        self.cache = KVCache(capacity=256)
        self.length = 0

    @torch.inference_mode()
    def extend(self, hidden: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """Run (T, C) states at positions length.. through the head; (T, R) logits if asked."""
        x = self.run_cached(hidden)
        return self.project(x, extra=True) if logits else None

    def run_cached(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
        """(T, C) inputs after the `length` cached positions through the head's layers and KV
        cache -> (T, C). Default: a chain at positions length..; a token tree gives its
        (1, 1, T, length + T) bool `mask` and (1, T) `positions`."""
        T = hidden.shape[0]
        position_ids = torch.arange(self.length, self.length + T, device=hidden.device)[None] \
            if positions is None else positions
        x = hidden[None]  # (1, T, C)
        rope = self.rotary(x, position_ids=position_ids)
        compiled = self.compiled_layers()
        if runs(compiled, hidden):
            x = compiled.run(hidden, 0, self.num_layers, self.length, self.cache, rope, mask)[None]
        else:
            mask = causal_mask(T, self.length, hidden.device) if mask is None else mask
            for layer in self.layers:
                x = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rope,
                          cache=self.cache, use_cache=True)
        self.length += T
        return x[0]

    def compiled_layers(self) -> CompiledLayers | None:
        """The compiled path of the head's layers, or None where it does not apply; made again
        when their weights were moved (`.to(dtype)` keeps the parameters, not their storage)."""
        key = tuple(p.data_ptr() for p in self._layer_parameters)
        if self._compiled_key != key:
            self._compiled, self._compiled_key = compiled_stack(self.layers), key
        return self._compiled

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the compiled path (ctypes handles); they make their own."""
        state = super().__getstate__()
        state["_compiled"], state["_compiled_key"] = None, None
        return state

    def rollback(self, length: int) -> None:
        """Forget every cached position from `length` on."""
        self.length = min(self.length, length)
        self.cache.rewind(self.length, range(self.num_layers))

    # ---- storage ------------------------------------------------------------------------------
    def state_to_save(self) -> dict[str, torch.Tensor]:
        tensors = {f"layers.{k}": v for k, v in self.layers.state_dict().items()}
        tensors.update({f"norm.{k}": v for k, v in self.norm.state_dict().items()})
        tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()}
        if self.vocab_ids is not None:
            tensors["vocab_ids"] = self.vocab_ids.to("cpu", torch.int32).contiguous()
        return tensors

    def save_pretrained(self, path: str | os.PathLike, **metadata) -> Path:
        """Write the head as fp16 safetensors with its metadata; returns the file's path."""
        from safetensors.torch import save_file

        path = _head_file(path, must_exist=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.metadata.update(metadata)
        header = {"format": FORMAT_VERSION, **self.kind_header(), "exit_layer": self.exit_layer, "num_layers": self.num_layers,
                  "reduced_vocab": None if self.vocab_ids is None else int(self.vocab_ids.numel()),
                  "fingerprint": self.fingerprint, **self.metadata}
        partial = path.with_name(path.name + ".partial")
        save_file(self.state_to_save(), str(partial), metadata={"specframe_head": json.dumps(header)})
        partial.replace(path)
        path.chmod(0o644)  # package data: readable by everyone
        return path

    def kind_header(self) -> dict:
        """What the file says about the head's kind: nothing for this kind (files before kinds existed)."""
        return {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, target_model) -> "EarlyExitHead":
        """Load a saved head for `target_model` (an HF model or a TargetModel), of the kind its
        file records (`EarlyExitHead`, or `EagleHead` for kind "eagle").

        Raises HeadFileError for a missing or corrupt file, ModelMismatchError for a head that
        was trained for another model.
        """
        path = _head_file(path, must_exist=True)
        header, tensors = read_head_file(path)
        cls = head_class(header.get("kind", "early_exit"), path)
        model = _hf_model(target_model)
        problem = fingerprint_mismatch(header["fingerprint"], model_fingerprint(model))
        if problem:
            trained = header["fingerprint"]["config"]
            raise ModelMismatchError(
                f"the draft head {str(path)!r} was trained for another model ({problem}; it belongs to a "
                f"{trained.get('model_type')} with {trained.get('num_hidden_layers')} layers and hidden size "
                f"{trained.get('hidden_size')}). Train a head for this model with `specframe train early-exit "
                f"--model PATH`, or drop the head= option to use the shipped head with the default model."
            )
        vocab_ids = tensors.pop("vocab_ids", None)
        metadata = {k: v for k, v in header.items()
                    if k not in ("format", "kind", "exit_layer", "num_layers", "reduced_vocab", "fingerprint")}
        head = cls(model, int(header["exit_layer"]), int(header.get("num_layers", 1)), vocab_ids, metadata)
        head._load_tensors(tensors, path)
        parameter = next(model.parameters())
        return head.to(parameter.device, parameter.dtype).eval()

    def drafting_copy(self, target_model) -> "EarlyExitHead":
        """A copy of this head as `from_pretrained` would load it after saving: fp16-rounded
        weights in the target's device and dtype (for measuring the draft step after training)."""
        model = _hf_model(target_model)
        copy_ = type(self)(model, self.exit_layer, self.num_layers, self.vocab_ids, self.metadata)
        copy_._load_tensors({k: v for k, v in self.state_to_save().items() if k != "vocab_ids"}, Path("(in memory)"))
        parameter = next(model.parameters())
        return copy_.to(parameter.device, parameter.dtype).eval()

    def _load_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        layers = {k[len("layers."):]: v for k, v in tensors.items() if k.startswith("layers.")}
        norm = {k[len("norm."):]: v for k, v in tensors.items() if k.startswith("norm.")}
        try:
            self.layers.load_state_dict(layers, strict=True)
            self.norm.load_state_dict(norm, strict=True)
        except RuntimeError as exc:
            raise HeadFileError(f"{str(path)!r} does not hold the weights this head needs: {exc}") from None


def head_class(kind: str, path: Path) -> type:
    """The head class of a kind recorded in a head file."""
    if kind == "early_exit":
        return EarlyExitHead
    if kind == "eagle":
        from .eagle_head import EagleHead

        return EagleHead
    raise HeadFileError(f"{str(path)!r} holds a head of kind {kind!r}, which this specframe does not know "
                        "(it knows 'early_exit' and 'eagle'); upgrade specframe")


def _head_file(path: str | os.PathLike, must_exist: bool) -> Path:
    path = Path(path)
    if path.is_dir() or (not must_exist and not path.suffix):
        path = path / "head.safetensors"
    if must_exist and not path.is_file():
        raise HeadFileError(f"no draft head at {str(path)!r}; give a .safetensors file written by `specframe train early-exit`")
    return path


def read_head_file(path: Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata header, tensors) of a head file, with clear errors for damaged files.

    tensors=False reads only the header (the tensors dict is then empty).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("specframe_head")
        tensors = load_file(str(path)) if tensors else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise HeadFileError(f"the draft head file {str(path)!r} is corrupt or truncated ({exc}); "
                            "re-create it with `specframe train early-exit` or reinstall specframe") from None
    if raw is None:
        raise HeadFileError(f"{str(path)!r} is a safetensors file but not a specframe draft head (no 'specframe_head' metadata)")
    try:
        header = json.loads(raw)
        int(header["exit_layer"]), header["fingerprint"]["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HeadFileError(f"the metadata of the draft head {str(path)!r} is damaged: {type(exc).__name__}: {exc}") from None
    if int(header.get("format", 0)) > FORMAT_VERSION:
        raise HeadFileError(f"{str(path)!r} uses head format {header['format']}; this specframe reads up to "
                            f"{FORMAT_VERSION}; upgrade specframe")
    return header, tensors


def shipped_head_path(model) -> Path | None:
    """The head shipped in specframe/heads/ for this model, if any (matched by fingerprint)."""
    if not SHIPPED_DIR.is_dir():
        return None
    fingerprint = model_fingerprint(_hf_model(model))
    for path in sorted(SHIPPED_DIR.glob("*.safetensors")):
        try:
            header, _ = read_head_file(path, tensors=False)
        except HeadFileError:
            continue
        if fingerprint_mismatch(header["fingerprint"], fingerprint) is None:
            return path
    return None
