"""The network as the objectives and samplers call it: `network(tokens, sigma, layout)`.

Wraps a DiT with what a call needs besides the weights: rotary positions (both halves of a
[x_t ; x_0] input share 0..L-1) and materialised attention masks, each built once per shape.
Torch only, so GPU scripts without Lightning use the same code as the LightningModule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.attention import AttentionMask, MaskCache
from models.dit import DiT


class BackboneNetwork:
    def __init__(self, backbone: DiT):
        self.backbone = backbone
        self.masks = MaskCache(backbone.config.attn_backend)
        self._positions: dict[tuple, Tensor] = {}

    def positions(self, length: int, halves: int, device) -> Tensor:
        """(length,) rotary positions: 0..length-1, or 0..L-1 twice for halves=2."""
        key = (length, halves, str(device))
        if key not in self._positions:
            self._positions[key] = torch.arange(length // halves, device=device).repeat(halves)
        return self._positions[key]

    def mask(self, predicate, length: int, device) -> AttentionMask:
        return self.masks.get(predicate, length, length, device)

    def __call__(self, tokens: Tensor, sigma: Tensor | None, layout) -> Tensor:
        """tokens (B, S), sigma (B,) or None -> logits; see algorithms.base.Layout."""
        S = tokens.shape[1]
        if sigma is None and self.backbone.sigma_map is not None:
            sigma = torch.zeros(tokens.shape[0], device=tokens.device)
        positions = self.positions(S, layout.halves, tokens.device)
        mask = self.mask(layout.mask, S, tokens.device)
        return self.backbone(tokens, sigma, positions, mask, layout.outputs)
