"""Rotary embeddings, attention masks as predicates, and the attention backend dispatch.

A mask is a frozen dataclass whose ``__call__(q_idx, kv_idx)`` returns a boolean tensor (True =
may attend). The same predicate is materialised as a dense boolean matrix for SDPA or as a flex
``BlockMask``, so the backends compute the same function. Masks know about blocks; the DiT does
not: it receives a materialised mask and applies it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("sdpa", "flex", "flash_attn")


# ----------------------------------------------------------------------------------------------
# Mask predicates
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockDiffusionMask:
    """The three-part mask over the 2L training input [x_t ; x_0] (SPEC 2.4).

    Query q may attend key k iff
      M_BD  (block-diagonal): same half and same block,
      M_OBC (offset block-causal): q in x_t, k in x_0 and block(k) < block(q),
      M_BC  (block-causal): both in x_0 and block(k) <= block(q).
    """

    seq_len: int  # L: length of one half
    block_size: int  # K

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        L, K = self.seq_len, self.block_size
        q_x0, k_x0 = q >= L, k >= L
        q_block = torch.where(q_x0, q - L, q) // K
        k_block = torch.where(k_x0, k - L, k) // K
        block_diagonal = (q_block == k_block) & (q_x0 == k_x0)
        offset_block_causal = ~q_x0 & k_x0 & (k_block < q_block)
        block_causal = q_x0 & k_x0 & (k_block <= q_block)
        return block_diagonal | offset_block_causal | block_causal


@dataclasses.dataclass(frozen=True)
class BlockCausalMask:
    """Block-causal attention over one clean-then-noisy stream (sampling without a KV cache):
    query q may attend key k iff block(k) <= block(q). Equals M_BC of the training mask."""

    block_size: int

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        return (k // self.block_size) <= (q // self.block_size)


@dataclasses.dataclass(frozen=True)
class BandedBlockCausalMask:
    """Block-causal attention limited to a window of `window_blocks` blocks (the current one
    included): query block b sees key blocks b - window_blocks + 1 .. b. Over a whole sequence
    this is exactly what block-by-block sampling with a sliding KV cache computes; with
    window_blocks >= the number of blocks it equals BlockCausalMask."""

    block_size: int
    window_blocks: int

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        q_block, k_block = q // self.block_size, k // self.block_size
        return (k_block <= q_block) & (k_block > q_block - self.window_blocks)


@dataclasses.dataclass(frozen=True)
class CausalMask:
    """Token-level causal attention (AR)."""

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        return k <= q


def dense_mask(mask: Any, q_len: int, kv_len: int, device: torch.device | str = "cpu") -> Tensor:
    """Materialise a predicate as a dense (q_len, kv_len) boolean tensor."""
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return mask(q, k)


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


@dataclasses.dataclass
class AttentionMask:
    """A materialised mask ready for one backend. ``None`` fields mean full attention.

    dense: (S_q, S_kv) bool tensor for SDPA; block_mask: a flex BlockMask; causal: True for
    token-causal attention (served natively by every backend, no matrix needed).
    """

    dense: Tensor | None = None
    block_mask: Any = None
    causal: bool = False
    # The predicate when its structure lets SDPA skip masked-out blocks (a BlockDiffusionMask
    # over [x_t ; x_0]); `parts` holds the small masks that path needs, built once.
    structure: Any = None
    parts: dict = dataclasses.field(default_factory=dict)


class MaskCache:
    """Builds each (predicate, shape, backend, device) mask once and reuses it."""

    def __init__(self, backend: str):
        self.backend = backend
        self._cache: dict[tuple, AttentionMask] = {}

    def get(self, mask: Any, q_len: int, kv_len: int, device: torch.device) -> AttentionMask:
        if mask is None:
            return AttentionMask()
        if isinstance(mask, CausalMask) and q_len == kv_len:
            return AttentionMask(causal=True)
        key = (mask, q_len, kv_len, str(device))
        if key not in self._cache:
            if self.backend == "flex":
                from torch.nn.attention.flex_attention import create_block_mask

                block_mask = create_block_mask(
                    lambda b, h, q, k: mask(q, k), None, None, q_len, kv_len, device=device
                )
                self._cache[key] = AttentionMask(block_mask=block_mask)
            else:
                dense = dense_mask(mask, q_len, kv_len, device)
                structured = (
                    isinstance(mask, BlockDiffusionMask) and q_len == kv_len == 2 * mask.seq_len
                )
                parts = block_diffusion_parts(mask, device) if structured else {}
                self._cache[key] = AttentionMask(
                    dense=dense, structure=mask if structured else None, parts=parts
                )
        return self._cache[key]


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if q.device.type != "cuda":  # CPU: eager, forward only (no backward on CPU, ENVIRONMENT.md)
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def block_diffusion_parts(mask: BlockDiffusionMask, device) -> dict:
    """The two (L, L) pieces of the block-diffusion mask that the structured path needs:
    x_0 queries over x_0 keys (block-causal, bool) and x_t queries over x_0 keys (strictly
    block-causal, as an additive 0 / -inf float mask)."""
    L = mask.seq_len
    q = torch.arange(L, device=device)[:, None] // mask.block_size
    k = torch.arange(L, device=device)[None, :] // mask.block_size
    strict = torch.zeros(L, L, device=device).masked_fill(k >= q, float("-inf"))
    return {"block_causal": k <= q, "strict_additive": strict}


def block_diffusion_attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Attention under the block-diffusion mask over [x_t ; x_0] without paying for the
    masked-out quarter and the off-diagonal x_t blocks (same function as the dense mask).

    x_0 queries attend x_0 keys block-causally (one SDPA call over L x L). An x_t query of block
    b attends the x_0 keys of blocks < b and the x_t keys of its own block: the scores against
    x_0 (L x L, strict block-causal) and against its own block (L x K, batched per block) share
    one softmax. q: (B, H, Q, d) for the first Q (L or 2L) positions; k, v:
    (B, H, 2L, d) -> (B, H, Q, d).
    """
    L, K = mask.structure.seq_len, mask.structure.block_size
    B, H, Q, d = q.shape
    nb = L // K
    k0, v0 = k[:, :, L:], v[:, :, L:]
    scale = d**-0.5
    qt = q[:, :, :L] * scale
    strict = mask.parts["strict_additive"]
    scores_x0 = torch.baddbmm(
        strict.to(q.dtype).expand(B * H, L, L),
        qt.reshape(B * H, L, d),
        k0.reshape(B * H, L, d).transpose(1, 2),
    ).view(B, H, L, L)
    kt = k[:, :, :L].reshape(B, H, nb, K, d)
    vt = v[:, :, :L].reshape(B, H, nb, K, d)
    scores_own = (qt.reshape(B, H, nb, K, d) @ kt.transpose(-1, -2)).reshape(B, H, L, K)
    probs = torch.softmax(torch.cat([scores_x0, scores_own], dim=-1), dim=-1)
    own = (probs[..., L:].reshape(B, H, nb, K, K) @ vt).reshape(B, H, L, d)
    out_t = torch.baddbmm(
        own.reshape(B * H, L, d),
        probs[..., :L].reshape(B * H, L, L),
        v0.reshape(B * H, L, d),
    ).view(B, H, L, d)
    if Q == L:
        return out_t
    out_0 = F.scaled_dot_product_attention(
        q[:, :, L:], k0, v0, attn_mask=mask.parts["block_causal"]
    )
    return torch.cat([out_t, out_0], dim=2)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    backend: str,
    structured: bool = True,
) -> Tensor:
    """Scaled dot-product attention, scale 1/sqrt(d), no dropout.

    q: (B, H, S_q, d); k, v: (B, H, S_kv, d) -> (B, H, S_q, d). S_q may be smaller than S_kv:
    the queries are then the first S_q positions (rows of the mask). structured: use the
    block-diffusion fast path when the mask allows it (sdpa; same function).
    """
    S_q, S_kv = q.shape[2], k.shape[2]
    if structured and backend == "sdpa" and mask.structure is not None:
        return block_diffusion_attend(q, k, v, mask)
    if S_q != S_kv:
        if mask.causal:
            dense = torch.ones(S_q, S_kv, dtype=torch.bool, device=q.device).tril()
        elif mask.dense is not None:
            dense = mask.dense[..., :S_q, :]
        elif mask.block_mask is not None:
            raise ValueError("a flex block mask cannot serve a subset of its queries")
        else:
            dense = None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    if backend == "flex" and mask.block_mask is not None:
        return _flex(q, k, v, mask.block_mask)
    if backend == "flash_attn" and mask.dense is None and mask.block_mask is None:
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=mask.causal
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.causal)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings (GPT-NeoX style, non-interleaved halves)
# ----------------------------------------------------------------------------------------------
class Rotary(nn.Module):
    """Holds ``inv_freq`` = 1/10000^(2j/d), j < d/2 (a persistent buffer, as in released weights)
    and returns cos/sin tables for arbitrary integer positions."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)
        self._table: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions: (S,) int -> cos, sin of shape (1, S, 1, d) in ``dtype``."""
        cached = self._table
        # Cached by identity: callers reuse one positions tensor per shape (no host sync here).
        if cached is not None and cached[0] is positions and cached[1].dtype == dtype:
            return cached[1], cached[2]
        freqs = torch.outer(positions.to(self.inv_freq.dtype), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos()[None, :, None, :].to(dtype)
        sin = emb.sin()[None, :, None, :].to(dtype)
        self._table = (positions, cos, sin)
        return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, S, H, d); cos/sin: (1, S, 1, d)."""
    return x * cos + rotate_half(x) * sin
