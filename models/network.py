"""The network as the objectives and samplers call it: `network(tokens, sigma, layout)`.

Wraps a token backbone (models.backbone.Backbone: the DiT, or any registered token network)
with what a call needs besides the weights: positions (both halves of a [x_t ; x_0] input share
0..L-1) and materialised attention masks, each built once per shape.
Torch only, so GPU scripts without Lightning use the same code as the LightningModule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.attention import AttentionMask, MaskCache
from models.backbone import Backbone


class BackboneNetwork:
    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.masks = MaskCache(backbone.attn_backend)
        self._positions: dict[tuple, Tensor] = {}

    def positions(self, length: int, halves: int, device) -> Tensor:
        """(length,) positions: 0..length-1, or 0..L-1 twice for halves=2."""
        key = (length, halves, str(device))
        if key not in self._positions:
            self._positions[key] = torch.arange(length // halves, device=device).repeat(halves)
        return self._positions[key]

    def mask(self, predicate, length: int, device) -> AttentionMask:
        return self.masks.get(predicate, length, length, device)

    def __call__(self, tokens: Tensor, sigma: Tensor | None, layout) -> Tensor:
        """tokens (B, S), sigma (B,) or None (sigma = 0) -> logits; see algorithms.base.Layout."""
        S = tokens.shape[1]
        return self.backbone(
            tokens,
            positions=self.positions(S, layout.halves, tokens.device),
            mask=self.mask(layout.mask, S, tokens.device),
            sigma=sigma,
            outputs=layout.outputs,
        )
