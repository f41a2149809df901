"""The DiT's typed records (plain data, no modules): `DiTConfig`, the shape and behaviour of
the network (models.dit.DiT); `Conditioning`, the adaLN modulation of one sigma
(DiT.condition); `InferenceSnapshot`, what DiT.prepare_inference() takes from the weights.
Callers import them from models.dit.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from models.attention import BACKENDS


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Shape and behaviour of the backbone.

    adaln: adaLN modulation layers exist (always for diffusion; absent for AR unless asked).
    causal: token-causal attention (AR).

    Work the network skips without changing its function (the "before" versions are oracles in
    benchmarks/baselines.py): under the block-diffusion training mask (sdpa backend) each query
    chunk attends to the keys it can see (models.attention.block_diffusion_attend; about a
    third of the dense (2L)^2 score entries; on GPU attn_backend=flex skips masked-out tiles);
    when only the first S' positions need logits, the last block computes queries, attention
    output and MLP for those positions only (keys/values still for all).
    """

    vocab_size: int
    hidden_size: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    causal: bool = False
    adaln: bool = True
    attn_backend: str = "sdpa"

    def __post_init__(self):
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by "
                f"model.n_heads={self.n_heads}"
            )
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"model.attn_backend={self.attn_backend!r}: valid are {BACKENDS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The adaLN modulation for one sigma (DiT.condition). blocks: per block (shift_msa,
    1 + scale_msa, gate_msa, shift_mlp, 1 + scale_mlp, gate_mlp); final: the output layer's
    (shift, 1 + scale). Every tensor is (B, 1, D)."""

    blocks: tuple[tuple[Tensor, ...], ...]
    final: tuple[Tensor, Tensor]


@dataclasses.dataclass
class InferenceSnapshot:
    """What DiT.prepare_inference() takes from the weights for calls with autograd off inside
    `DiT.inference(..., snapshot)`. head_t: the output projection's weight transposed, (D, V)
    contiguous, on CPU (None elsewhere; DiTFinalLayer._project). constant: the adaLN
    modulation at sigma = 0 (a call with sigma=None) by (batch, device, autocast), computed at
    its first use. Stale once the weights change: take a new one then."""

    head_t: Tensor | None
    constant: dict[tuple, Conditioning] = dataclasses.field(default_factory=dict)
