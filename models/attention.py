"""Rotary embeddings, attention masks as predicates, and the attention backend dispatch.

A mask is a frozen dataclass whose ``__call__(q_idx, kv_idx)`` returns a boolean tensor (True =
may attend). The same predicate is materialised as a dense boolean matrix for SDPA or as a flex
``BlockMask``, so the backends compute the same function. Masks know about blocks; the DiT does
not: it receives a materialised mask and applies it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
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
    """The three-part mask over the 2L training input [x_t ; x_0] (paper Sec. 3.2).

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
    # the predicate it was materialised from (None: full attention) and, with prompt padding,
    # the (B, S) validity of the keys: a backbone that needs the block structure (the token
    # shift of models.hf_causal) reads them instead of the matrix
    predicate: Any = None
    key_valid: Tensor | None = None


class MaskCache:
    """Builds each (predicate, shape, backend, device) mask once and reuses it."""

    def __init__(self, backend: str):
        self.backend = backend
        self._cache: dict[tuple, AttentionMask] = {}

    def get(self, mask: Any, q_len: int, kv_len: int, device: torch.device) -> AttentionMask:
        if mask is None:
            return AttentionMask()
        if isinstance(mask, CausalMask) and q_len == kv_len:
            return AttentionMask(causal=True, predicate=mask)
        key = (mask, q_len, kv_len, str(device))
        if key not in self._cache:
            if self.backend == "flex":
                from torch.nn.attention.flex_attention import create_block_mask

                block_mask = create_block_mask(
                    lambda b, h, q, k: mask(q, k), None, None, q_len, kv_len, device=device
                )
                self._cache[key] = AttentionMask(block_mask=block_mask, predicate=mask)
            else:
                dense = dense_mask(mask, q_len, kv_len, device)
                structured = (
                    isinstance(mask, BlockDiffusionMask) and q_len == kv_len == 2 * mask.seq_len
                )
                parts = block_diffusion_parts(mask, device) if structured else {}
                self._cache[key] = AttentionMask(
                    dense=dense, structure=mask if structured else None, parts=parts,
                    predicate=mask,
                )  # fmt: skip
        return self._cache[key]


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
_compiled_flex = None
FLEX_EAGER_WARNING = "flex_attention called without torch.compile"


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    # inside a compiled region (compiled DiT blocks) the enclosing compile handles flex itself
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    # CPU: eager on purpose, forward only (flex attention has no CPU backward); torch's warning
    # that eager flex is unfused (10 lines, advice to compile) is about speed, not results
    if q.device.type != "cuda":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", FLEX_EAGER_WARNING, UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


STRUCTURED_CHUNKS = 4  # query chunks per half in block_diffusion_attend (measured best on CPU)


def block_diffusion_parts(mask: BlockDiffusionMask, device) -> dict:
    """The per-chunk masks of block_diffusion_attend, built once per shape.

    The L positions of each half are cut into chunks of c tokens (c a multiple of K, about
    L / STRUCTURED_CHUNKS). For the chunk [a, b): x_t rows see the x_0 keys [0, b - K) and the
    x_t keys [a, b); x_0 rows see the x_0 keys [0, b). Each mask is the matching sub-matrix of
    the dense (2L, 2L) mask, so the function is unchanged.
    Returns {"spans": [(a, b)], "xt": [(c, b - K + c) bool], "x0": [(c, b) bool]}.
    """
    L, K = mask.seq_len, mask.block_size
    chunk = max(K, -(-L // (STRUCTURED_CHUNKS * K)) * K)
    full = dense_mask(mask, 2 * L, 2 * L, device)
    spans, xt, x0 = [], [], []
    for a in range(0, L, chunk):
        b = min(a + chunk, L)
        keys = torch.cat([torch.arange(L, L + b - K), torch.arange(a, b)]).to(device)
        spans.append((a, b))
        xt.append(full[a:b][:, keys].contiguous())
        x0.append(full[L + a : L + b, L : L + b].contiguous())
    return {"spans": spans, "xt": xt, "x0": x0}


def block_diffusion_attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Attention under the block-diffusion mask over [x_t ; x_0] that skips most masked-out
    entries: the same function as SDPA over the dense (2L, 2L) mask, about a third of the score
    entries (one SDPA call per query chunk and half, see block_diffusion_parts).

    An x_t row of block b sees the x_0 keys of blocks < b and the x_t keys of its own block; an
    x_0 row sees the x_0 keys of blocks <= b. q: (B, H, Q, d) for the first Q (L or 2L)
    positions; k, v: (B, H, 2L, d) -> (B, H, Q, d).
    """
    L, K = mask.structure.seq_len, mask.structure.block_size
    parts = mask.parts
    outs_t, outs_0 = [], []
    for (a, b), m_t, m_0 in zip(parts["spans"], parts["xt"], parts["x0"], strict=True):
        keys = torch.cat([k[:, :, L : L + b - K], k[:, :, a:b]], dim=2)
        values = torch.cat([v[:, :, L : L + b - K], v[:, :, a:b]], dim=2)
        outs_t.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=m_t))
        if q.shape[2] > L:
            outs_0.append(
                F.scaled_dot_product_attention(
                    q[:, :, L + a : L + b], k[:, :, L : L + b], v[:, :, L : L + b], attn_mask=m_0
                )
            )
    return torch.cat(outs_t + outs_0, dim=2)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    backend: str,
) -> Tensor:
    """Scaled dot-product attention, scale 1/sqrt(d), no dropout.

    q: (B, H, S_q, d); k, v: (B, H, S_kv, d) -> (B, H, S_q, d). S_q may be smaller than S_kv:
    the queries are then the first S_q positions (rows of the mask). A mask that carries its
    block-diffusion structure (sdpa) takes the chunked path, block_diffusion_attend (same
    function).
    """
    S_q, S_kv = q.shape[2], k.shape[2]
    if backend == "sdpa" and mask.structure is not None:
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
def rotary_inv_freq(head_dim: int, base: float = 10_000.0) -> Tensor:
    """(head_dim / 2,) float32: 1 / base^(2j / head_dim), j < head_dim / 2."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


class Rotary(nn.Module):
    """Holds ``inv_freq`` = `rotary_inv_freq(head_dim)` (a persistent buffer, as in released
    weights) and returns cos/sin tables for arbitrary integer positions."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base))
        self._table: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions: (S,) int -> cos, sin of shape (1, S, 1, d) in ``dtype``."""
        cached = self._table
        # Cached by identity: callers reuse one positions tensor per shape (no host sync here).
        if cached is not None and cached[0] is positions and cached[1].dtype == dtype:
            return cached[1], cached[2]
        # float32 whatever the buffer's dtype (FSDP mixed precision may cast buffers to bf16,
        # which would round positions above 256)
        freqs = torch.outer(positions.float(), self.inv_freq.float())
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
