"""An early-exit head that also reads the target's last-layer feature (EAGLE's insight).

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", ICML 2024
(arXiv 2401.15077): a one-layer head that reads the target's top-layer feature of the previous
position predicts the next token far better than one that reads tokens alone. Here the head
keeps EESD's shared trunk (the target's first N layers, `specframe.heads`) and adds that feature:

    input_t = fuse([h_t ; f_{t-1}])    h_t: the state after layer N of token t
                                       f_{t-1}: the target's last-layer feature (after its final
                                       norm, what the LM head reads) of position t - 1
    x_t = layer(s)(input_t); f^_t = norm(x_t); logits_t = LM head(f^_t), predicting token t + 1

`fuse` is Linear(2C -> C), initialised to pass h_t through, so an untrained head is an
`EarlyExitHead`. The head is trained to regress f^_t onto f_t (smooth L1) besides the token
loss. While drafting, f_{t-1} is known for verified positions only: the first draft of a round
reads the true feature of the last verified position, later drafts read the head's own f^
(feature-level autoregression, as EAGLE does). Head positions computed from a predicted feature
are recomputed from the true one once verified (`exact_length`).

Shapes: B sequences, T positions, C hidden size, R reduced vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .heads import EarlyExitHead
from .kernels.linear import linear as few_row_or_torch_linear


class EagleHead(EarlyExitHead):
    """`EarlyExitHead` whose input also holds the target's last-layer feature of the previous position."""

    kind = "eagle"

    def __init__(self, target_model, exit_layer: int, num_layers: int = 1, vocab_ids: torch.Tensor | None = None,
                 metadata: dict | None = None):
        super().__init__(target_model, exit_layer, num_layers, vocab_ids, metadata)
        C = self.norm.weight.shape[0]
        self.fuse = nn.Linear(2 * C, C, bias=False)
        with torch.no_grad():  # pass h_t through: an untrained head is an EarlyExitHead
            self.fuse.weight.zero_()
            self.fuse.weight[:, :C] = torch.eye(C)
        self.fuse.to(self.norm.weight.device, self.norm.weight.dtype)
        self.exact_length = 0  # head positions [0, exact_length) were computed from true features

    def kind_header(self) -> dict:
        return {"kind": self.kind}

    # ---- teacher-forced training --------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) layer-N states and (B, T, C) features of the previous positions ->
        ((B, T, R) logits, (B, T, C) predicted features f^)."""
        features = self.norm(self.body(self.fuse(torch.cat([hidden, previous], -1))))
        return self.score(features), features

    # ---- drafting with a KV cache -------------------------------------------------------------
    def reset_cache(self) -> None:
        super().reset_cache()
        self.exact_length = 0

    @torch.inference_mode()
    def extend_with(self, hidden: torch.Tensor, previous: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run (T, C) states and (T, C) previous-position features at positions length.. through
        the head -> ((T, R [+ E]) logits, (T, C) predicted features). `exact`: the features are
        the target's own, so these positions need no recomputation once verified."""
        if exact and self.exact_length == self.length:
            self.exact_length += hidden.shape[0]
        features = self.norm(self.run_cached(self.fused_input(hidden, previous)))
        return self.score(features, extra=True), features

    def fused_input(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """(T, C) states and (T, C) previous features -> (T, C) layer input: `self.fuse`, through
        the few-row kernel while drafting on CPU in fp32 or bf16."""
        return few_row_or_torch_linear(torch.cat([hidden, previous], -1), self.fuse.weight)

    def rollback(self, length: int) -> None:
        super().rollback(length)
        self.exact_length = min(self.exact_length, self.length)

    # ---- storage ------------------------------------------------------------------------------
    def state_to_save(self) -> dict[str, torch.Tensor]:
        tensors = super().state_to_save()
        tensors["fuse.weight"] = self.fuse.weight.detach().to("cpu", torch.float16).contiguous()
        return tensors

    def _load_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        from .heads import HeadFileError

        tensors = dict(tensors)
        fuse = tensors.pop("fuse.weight", None)
        if fuse is None or fuse.shape != self.fuse.weight.shape:
            raise HeadFileError(f"{str(path)!r} is an eagle head without a {tuple(self.fuse.weight.shape)} "
                                "'fuse.weight'; re-create it with `specframe train early-exit --head-kind eagle`")
        super()._load_tensors(tensors, path)
        with torch.no_grad():
            self.fuse.weight.copy_(fuse)
