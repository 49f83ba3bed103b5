"""The target-model adapter: forward passes over new tokens with a KV cache, and rollback.

Two paths:
- *layered* (Llama-style decoders: `model.model.{embed_tokens, layers, norm, rotary_emb}`): the
  engine runs the decoder layers itself over a preallocated KV cache that rollback only rewinds.
  It can split the stack at layer N, so an early-exit drafter runs layers 1..N once per token and
  verification reuses their KV cache and activations (EESD, Liu et al. 2024).
- *generic*: any other Hugging Face causal LM, through `model(..., cache=DynamicCache)`.

Shapes: T new tokens, S cached tokens, C hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import DynamicCache

from attrs import field, frozen

from .checks import is_int
from .errors import PluginContractError, SpecframeError
from .kernels import TREE_MASK_FLAG, FewRowKernels
from .kernels.layers import compiled_layers, runs
from .trees import tree_attention_mask, tree_positions

_LAYERED_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


class KVCache:
    """Per-layer key/value buffers, preallocated and grown by doubling; rollback only rewinds."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (1, H, capacity, D)
        self.values: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append (1, H, T, D) keys/values of one layer and return all of that layer's so far."""
        start = self.lengths.get(layer_idx, 0)
        end = start + key.shape[-2]
        self._reserve(layer_idx, key, value, end)
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def _reserve(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, end: int) -> None:
        buffer = self.keys.get(layer_idx)
        if buffer is not None and buffer.shape[-2] >= end:
            return
        size = max(self.capacity, end * 2)
        B, H, _, D = key.shape
        new_keys = key.new_empty(B, H, size, D)
        new_values = value.new_empty(B, H, size, value.shape[-1])
        if buffer is not None:
            kept = self.lengths[layer_idx]
            new_keys[:, :, :kept] = buffer[:, :, :kept]
            new_values[:, :, :kept] = self.values[layer_idx][:, :, :kept]
        self.keys[layer_idx], self.values[layer_idx] = new_keys, new_values

    def length(self, layer_idx: int) -> int:
        return self.lengths.get(layer_idx, 0)

    def make_room(self, layer_idx: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's whole (1, H, capacity, D) key and value buffers, grown to hold `end` tokens;
        `like` (1, H, 0, D) gives the shape and dtype of a first buffer. For writers that fill
        the buffers in place (the compiled layers) and then set `lengths`."""
        self._reserve(layer_idx, like, like, end)
        return self.keys[layer_idx], self.values[layer_idx]

    def keep(self, start: int, rows: torch.Tensor, layers: range) -> None:
        """Move the entries at positions `rows` (n,) to start.. and forget the rest after them."""
        end = start + rows.shape[0]
        for layer_idx in layers:
            for buffer in (self.keys[layer_idx], self.values[layer_idx]):
                buffer[:, :, start:end] = buffer[:, :, rows]  # the index copies before it writes
            self.lengths[layer_idx] = end

    def rewind(self, length: int, layers: range) -> None:
        for layer_idx in layers:
            self.lengths[layer_idx] = min(self.lengths.get(layer_idx, 0), length)

    # transformers' mask helpers may ask these of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length(layer_idx)


def is_layered(model) -> bool:
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(model, "lm_head") and all(hasattr(inner, p) for p in _LAYERED_PARTS)


def causal_mask(T: int, start: int, device) -> torch.Tensor | None:
    """(1, 1, T, start + T) bool mask: new token i sees cached tokens and new tokens <= i."""
    if T == 1:
        return None
    key_pos = torch.arange(start + T, device=device)
    query_pos = torch.arange(start, start + T, device=device)[:, None]
    return (key_pos[None, :] <= query_pos)[None, None]


@frozen
class SplitView:
    """What `TargetModel.enable_split(N)` hands a drafter: the target's layers [0, N), shared.

    Tokens run through `lower` are cached in those layers and their states kept, so the
    verification pass that follows runs only layers N..L-1 for them (EESD's shared trunk).
    """

    _target: "TargetModel" = field(repr=False)  # not for drafters: they use the methods below
    layer: int  # N: the split layer

    def lower(self, ids: torch.Tensor) -> torch.Tensor:
        """Run (T,) tokens that follow everything cached through layers [0, N); return (T, C)."""
        return self._target._lower(ids)

    def lower_tree(self, ids: torch.Tensor, parents: tuple[int, ...]) -> torch.Tensor:
        """Run (T,) nodes of a tree draft through layers [0, N), after the root (lowered first with
        `lower`) and the nodes lowered before them: `parents` (T,) index the tree's nodes as in
        `specframe.trees` (-1 the root). Each node sees the cache and its ancestors, at position
        start + depth; verification reuses them as a prefix of the tree. Returns (T, C)."""
        return self._target._lower_tree(ids, parents)

    def hidden(self, start: int, end: int) -> torch.Tensor:
        """(end - start, C) states after layer N of tokens at positions [start, end) already run.

        Covers the prompt (from the prefill), the drafted tokens and those verification added.
        """
        return self._target._split_states(start, end)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's own final norm and LM head on (T, C) states -> (T, V)."""
        return self._target.logits(hidden)

    def final_hidden(self, start: int, end: int) -> torch.Tensor:
        """(end - start, C) last-layer features (after the final norm: what the LM head reads) of
        verified tokens at positions [start, end); only for a split enabled with `final=True`."""
        return self._target._final_states(start, end)


class TargetModel:
    """A Hugging Face causal LM with a KV cache that the engine owns and rolls back.

    `length` is the number of tokens whose keys and values are cached in every layer. What
    drafters may use is documented in docs/plugins.md ("The target a drafter sees").
    """

    def __init__(self, model, layered: bool | None = None):
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        text_config = model.config.get_text_config()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = head.weight.shape[0] if head is not None else text_config.vocab_size
        self.num_layers = text_config.num_hidden_layers
        self.layered = is_layered(model) if layered is None else layered
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.split_layer: int | None = None  # layers [0, split) are "lower", shared with a drafter
        self.kernels = FewRowKernels(model)  # passes over 1-16 tokens read each weight once
        self.compiled = compiled_layers(model) if self.layered else None  # Llama layers in one C call
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache = KVCache() if self.layered else DynamicCache(config=self.config)
        self.length = 0
        self.ids: list[int] = []  # the cached tokens (length of them)
        self.lower_ids: list[int] = []  # tokens already run through the lower layers only
        self.lower_parents: list[int] | None = None  # their parents when lowered as a tree's nodes
        self.split_hidden: torch.Tensor | None = None  # (S, C) hidden states at the split layer
        self.split_from = 0  # states at the split are stored for positions split_from..
        self.final_hidden: torch.Tensor | None = None  # (S, C) last-layer features, kept if a split asks
        self.final_from: int | None = None  # None: not kept; else kept for positions final_from..
        self.tree_start: int | None = None  # where the last tree pass began, until keep_path

    def enable_split(self, layer: int, final: bool = False) -> SplitView:
        """Let a drafter run layers [0, layer) ahead of verification (needs the layered path).

        Best called from `Drafter.before_prefill`, so the prefill keeps the prompt's states at the
        split; called later, the states of tokens cached before are computed when first asked for.
        `final=True` also keeps the last-layer features of verified tokens (`SplitView.final_hidden`);
        without it, passes keep nothing more.
        """
        if not self.layered:
            raise SpecframeError(
                f"{type(self.model).__name__} is not a Llama-style decoder, so its layers cannot be "
                "split for early exit; use a drafter such as 'ngram' or 'draft_model' instead"
            )
        if not is_int(layer) or not 0 < layer < self.num_layers:
            raise SpecframeError(f"exit layer must be in [1, {self.num_layers - 1}], got {layer!r}")
        if layer != self.split_layer:
            if self.lower_ids:
                raise PluginContractError("target", "the split cannot move while lowered tokens await verification")
            self.split_layer, self.split_from = layer, self.length
        if final and self.final_from is None:
            self.final_from = self.length
        return SplitView(self, layer)

    # ---- forward passes ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Run (T,) new tokens through the whole model and cache them; return (T, V) logits.

        `logits_to_keep` = n > 0 returns only the last n rows, as in transformers: a prefill
        needs one row, and the LM head over every prompt position would cost more than the
        layers' share of the prompt's last token.
        """
        if not self.layered:
            return self._generic_forward(ids, logits_to_keep)
        pending = len(self.lower_ids)
        if pending:  # a drafter already ran the lower layers on a prefix of ids
            if ids[:pending].tolist() != self.lower_ids or self.lower_parents is not None:
                raise PluginContractError("target", "verified tokens must extend the drafted lower-layer prefix "
                                          "(and nodes lowered as a tree are verified as that tree)")
            ids = ids[pending:]
        if self.split_layer:
            lowered = self._lower(ids) if len(ids) else self.split_hidden[:0]  # all drafted: none new
            hidden = torch.cat([self.split_hidden[self.length : self.length + pending], lowered])
            hidden = self._run_layers(hidden, self.split_layer, self.num_layers, self.length)
            if self.final_from is not None:
                self.final_hidden = _stored(self.final_hidden, self.final_norm(hidden), self.length)
            self.ids += self.lower_ids
            self.lower_ids = []
        else:
            hidden = self._embed_run(ids, 0, self.num_layers)
            self.ids += ids.tolist()
        self.length += hidden.shape[0]
        return self.logits(hidden[-logits_to_keep:])

    @torch.inference_mode()
    def forward_tree(self, ids: torch.Tensor, parents: tuple[int, ...]) -> torch.Tensor:
        """Score a tree draft in one pass: (K+1,) ids = [root, node 0, ..., node K-1] with the
        nodes' parents (K,) as in `specframe.trees`; return (K+1, V) logits.

        Each token attends to the cache, its ancestors and itself, at position start + depth.
        Every scored token is cached until `keep_path` keeps the root and the accepted path.
        A drafter may have run a chain at the head of the tree (the root and nodes 0, 1, ... each
        the child of the one before) through the lower layers already; those are reused.
        """
        if not self.layered:
            raise SpecframeError(f"{type(self.model).__name__} is not a Llama-style decoder, so tree drafts "
                                 "cannot be verified; draft a chain instead")
        pending = len(self.lower_ids)
        lowered = tuple(range(-1, pending - 2)) if self.lower_parents is None else tuple(self.lower_parents)
        if pending and (ids[:pending].tolist() != self.lower_ids or tuple(parents[: pending - 1]) != lowered):
            raise PluginContractError("target", "the tokens run through the lower layers are the root and the "
                                      "tree's first nodes", f"lowered {self.lower_ids}, parents {parents}")
        start = self.length
        mask = tree_attention_mask(parents, start, self.device)  # (1, 1, K+1, start+K+1)
        positions = tree_positions(parents, start, self.device)  # (1, K+1)
        hidden = self.model.model.embed_tokens(ids[pending:].to(self.device)[None])[0]  # (K+1-pending, C)
        first = 0
        if self.split_layer:  # keep the states at the split, as a chain pass does
            if pending < len(ids):
                lowered = self._run_layers(hidden, 0, self.split_layer, start + pending, mask=mask[:, :, pending:],
                                           positions=positions[:, pending:])
                self._store_split_hidden(lowered, start + pending)
            hidden = self.split_hidden[start : start + len(ids)]
            first = self.split_layer
        hidden = self._run_layers(hidden, first, self.num_layers, start, mask=mask, positions=positions)
        if self.final_from is not None:  # an eagle head reads the accepted path's features
            self.final_hidden = _stored(self.final_hidden, self.final_norm(hidden), start)
        self.ids += ids.tolist()
        self.lower_ids, self.lower_parents = [], None
        self.length += hidden.shape[0]
        self.tree_start = start
        return self.logits(hidden)

    @torch.inference_mode()
    def keep_path(self, path: tuple[int, ...]) -> None:
        """After `forward_tree`, keep the root and the nodes of `path` (root first), compacted
        to consecutive positions in every layer (and at the split); forget the other nodes."""
        assert self.tree_start is not None, "keep_path follows forward_tree"
        start, self.tree_start = self.tree_start, None
        rows = torch.tensor([start, *(start + 1 + node for node in path)], device=self.device)
        self.cache.keep(start, rows, range(self.num_layers))
        if self.split_layer and self.split_hidden is not None:
            self.split_hidden[start : start + rows.shape[0]] = self.split_hidden[rows]
        if self.final_from is not None and self.final_hidden is not None:
            self.final_hidden[start : start + rows.shape[0]] = self.final_hidden[rows]
        self.ids = self.ids[:start] + [self.ids[r] for r in rows.tolist()]
        self.length = start + rows.shape[0]

    @torch.inference_mode()
    def _lower(self, ids: torch.Tensor) -> torch.Tensor:
        """Run (T,) tokens through layers [0, split); return their (T, C) hidden states."""
        start = self.length + len(self.lower_ids)
        hidden = self._embed_run(ids, 0, self.split_layer, start)
        self._store_split_hidden(hidden, start)
        self.lower_ids.extend(ids.tolist())
        return hidden

    @torch.inference_mode()
    def _lower_tree(self, ids: torch.Tensor, parents: tuple[int, ...]) -> torch.Tensor:
        """Run (T,) tree nodes through layers [0, split) with the tree's mask; return (T, C)."""
        pending = len(self.lower_ids)
        known = tuple(range(-1, pending - 2)) if self.lower_parents is None else tuple(self.lower_parents)
        tree = (*known, *parents)
        if not pending or any(not -1 <= p < pending - 1 + i for i, p in enumerate(parents)):
            raise PluginContractError("target", "lower_tree() follows the lowered root, parents before children",
                                      f"{pending} lowered, parents {parents}")
        start = self.length
        mask = tree_attention_mask(tree, start, self.device)[:, :, pending:]  # (1, 1, T, start + pending + T)
        positions = tree_positions(tree, start, self.device)[:, pending:]  # (1, T)
        hidden = self.model.model.embed_tokens(ids.to(self.device)[None])[0]
        hidden = self._run_layers(hidden, 0, self.split_layer, start + pending, mask=mask, positions=positions)
        self._store_split_hidden(hidden, start + pending)
        self.lower_ids.extend(ids.tolist())
        self.lower_parents = list(tree)
        return hidden

    @torch.inference_mode()
    def _split_states(self, start: int, end: int) -> torch.Tensor:
        if not 0 <= start <= end <= self.length + len(self.lower_ids):
            raise PluginContractError("target", "split states exist only for tokens already run",
                                      f"asked for [{start}, {end}) with {self.length} cached")
        if start < self.split_from:  # cached before the split was enabled: run layers [0, N) aside
            ids = torch.tensor(self.ids[: self.split_from])
            self._store_split_hidden(self._embed_run(ids, 0, self.split_layer, 0, KVCache()), 0)
            self.split_from = 0
        return self.split_hidden[start:end]

    @torch.inference_mode()
    def _final_states(self, start: int, end: int) -> torch.Tensor:
        if self.final_from is None:
            raise PluginContractError("target", "last-layer features are kept only for a split enabled with final=True")
        if not 0 <= start <= end <= self.length:
            raise PluginContractError("target", "last-layer features exist only for verified tokens",
                                      f"asked for [{start}, {end}) with {self.length} verified")
        if start < self.final_from:  # verified before they were kept: run the whole stack aside
            ids = torch.tensor(self.ids[: self.final_from])
            hidden = self._embed_run(ids, 0, self.num_layers, 0, KVCache())
            self.final_hidden = _stored(self.final_hidden, self.final_norm(hidden), 0)
            self.final_from = 0
        return self.final_hidden[start:end]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on (T, C) hidden states of the last layer -> (T, V)."""
        return self.kernels.forward(self.model.lm_head, self.final_norm(hidden))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.norm(hidden)

    def _embed_run(self, ids: torch.Tensor, first: int, last: int, start: int | None = None,
                   cache: KVCache | None = None) -> torch.Tensor:
        start = self.length if start is None else start
        hidden = self.model.model.embed_tokens(ids.to(self.device)[None])[0]  # (T, C)
        return self._run_layers(hidden, first, last, start, cache)

    def _run_layers(self, hidden: torch.Tensor, first: int, last: int, start: int,
                    cache: KVCache | None = None, mask: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run (T, C) hidden states at positions start.. through layers [first, last), caching
        their keys and values in `cache` (default: the target's own). A tree pass gives its own
        `mask` (1, 1, T, start + T) and `positions` (1, T); the default is the causal chain."""
        T = hidden.shape[0]
        inner = self.model.model
        position_ids = torch.arange(start, start + T, device=self.device)[None] if positions is None else positions
        x = hidden[None]  # (1, T, C)
        rope = inner.rotary_emb(x, position_ids=position_ids)
        if runs(self.compiled, hidden):
            return self.compiled.run(hidden, first, last, start, self.cache if cache is None else cache, rope, mask)
        tree = {} if mask is None else {TREE_MASK_FLAG: True}  # the few-row attention must read this mask
        mask = causal_mask(T, start, self.device) if mask is None else mask
        with self.kernels:
            for layer in inner.layers[first:last]:
                x = layer(x, attention_mask=mask, position_ids=position_ids,
                          cache=self.cache if cache is None else cache, use_cache=True, position_embeddings=rope,
                          **tree)
        return x[0]

    def _store_split_hidden(self, hidden: torch.Tensor, start: int) -> None:
        self.split_hidden = _stored(self.split_hidden, hidden, start)

    def _generic_forward(self, ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        keep = {"logits_to_keep": logits_to_keep} if self._takes_logits_to_keep else {}
        out = self.model(input_ids=ids.to(self.device)[None], cache=self.cache, use_cache=True, **keep)
        self.length += ids.shape[0]
        self.ids += ids.tolist()
        return out.logits[0, -logits_to_keep:]

    # ---- rollback ----------------------------------------------------------------------------
    def rollback(self, length: int) -> None:
        """Forget every cached token from position `length` on, in all layers."""
        assert 0 <= length <= self.length + len(self.lower_ids), (
            f"cannot roll back to {length}: only {self.length} tokens are cached"
        )
        self.lower_ids = self.lower_ids[: max(0, length - self.length)]
        if self.lower_parents is not None:
            self.lower_parents = self.lower_parents[: max(0, len(self.lower_ids) - 1)] if self.lower_ids else None
        self.length = min(self.length, length)
        self.ids = self.ids[: self.length]
        self.split_from = min(self.split_from, length)
        self.tree_start = None
        if self.layered:
            self.cache.rewind(length, range(self.num_layers))
            return
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)

    def cached_length(self) -> int:
        """Tokens cached in the last layer, for the engine's invariant check."""
        if self.layered:
            return self.cache.length(self.num_layers - 1)
        return self.cache.get_seq_length()


def _stored(buffer: torch.Tensor | None, rows: torch.Tensor, start: int) -> torch.Tensor:
    """Write (T, C) rows at [start, start + T) of a growable (S, C) buffer; return the buffer."""
    end = start + rows.shape[0]
    if buffer is None or buffer.shape[0] < end:
        grown = rows.new_empty(max(256, 2 * end), rows.shape[1])
        if buffer is not None:
            grown[:start] = buffer[:start]
        buffer = grown
    buffer[start:end] = rows
    return buffer


@contextlib.contextmanager
def temporarily_eval(model):
    """Put a model in eval mode for a block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
