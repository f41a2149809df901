"""An explicit, preallocated KV cache for block-by-block sampling (passed to DiT.forward).

Per layer it holds the post-rotary keys and values of committed (clean) tokens in a ring of
`capacity` = window - block_size slots, plus `block_size` scratch slots for the block being
denoised. A denoising call writes the block's keys/values into the scratch slots and attends
over ring + scratch with full attention (a per-sequence key-validity mask hides empty slots and
prompt padding). A commit call also copies them into the oldest ring slots; validity is updated
after the call (`advance`), so a block never sees its own keys twice.

Keys carry absolute rotary positions. Scores depend only on relative positions, so once the
ring wraps (sequences longer than the window) the cache equals a full recomputation under the
banded block-causal mask (`models.attention.BandedBlockCausalMask`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        window: int,
        block_size: int,
        device: torch.device,
    ):
        """Keys/values are allocated at the first call, in the dtype the network computes in
        (bf16 under autocast, else float32), on `device`."""
        if window % block_size or window < block_size:
            raise ValueError(f"KV cache window {window} must be a multiple of block {block_size}")
        self.block_size = block_size
        self.capacity = window - block_size
        self.shape = (n_layers, batch_size, n_heads, self.capacity + block_size, head_dim)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.valid = torch.zeros(
            batch_size, self.capacity + block_size, dtype=torch.bool, device=device
        )
        self.valid[:, self.capacity :] = True
        self.num_committed = 0  # blocks committed so far (host-side counter, no syncs)

    @property
    def slot(self) -> slice:
        """Ring slots the next committed block overwrites (the oldest block once full)."""
        if self.capacity == 0:
            return slice(0, 0)
        start = (self.num_committed * self.block_size) % self.capacity
        return slice(start, start + self.block_size)

    def attend(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        commit: bool,
        block_valid: Tensor | None = None,
    ) -> Tensor:
        """q, k, v: (B, H, K, d) for the current block -> attention output (B, H, K, d).

        commit: also store k, v as the newest committed block. block_valid: (B, K) bool, False
        at prompt padding: real tokens then ignore padding in their own block, and padding
        attends only padding there (so its values stay finite; nobody reads them)."""
        if q.shape[2] != self.block_size:
            raise ValueError(f"KV cache expects blocks of {self.block_size} tokens")
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        self.k[layer, :, :, self.capacity :] = k
        self.v[layer, :, :, self.capacity :] = v
        if block_valid is None:
            mask = self.valid[:, None, None, :]
        else:
            K = self.block_size
            ring = self.valid[:, None, None, : self.capacity].expand(-1, 1, K, -1)
            own = (block_valid[:, :, None] == block_valid[:, None, :])[:, None]
            mask = torch.cat([ring, own], dim=-1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, self.k[layer], self.v[layer], attn_mask=mask
        )
        if commit:  # after attending: the block it replaces is still in this block's window
            self.k[layer, :, :, self.slot] = k
            self.v[layer, :, :, self.slot] = v
        return out

    def advance(self, block_valid: Tensor | None = None) -> None:
        """Mark the block just committed as visible. block_valid: (B, K) bool (False for prompt
        padding), all True by default."""
        slot = self.slot
        if self.capacity:
            self.valid[:, slot] = True if block_valid is None else block_valid
        self.num_committed += 1
