"""An explicit, preallocated KV cache for block-by-block sampling, installed on a token backbone
(models.backbone: `set_kv_cache`, `inference`) for the calls that read it.

Per layer it holds the post-rotary keys and values of committed (clean) tokens in a ring of
`capacity` = window - block_size slots, plus scratch slots: K for the block being denoised and
K for a clean block committed in the same call. Slots per layer, in order:
[previous block (K) | ring (capacity) | current block (K)].

A denoising call (K tokens) writes the block's keys/values into the current-block slots and
attends over ring + current block with full attention (a per-sequence key-validity mask hides
empty slots and prompt padding; until the ring first wraps, and without prompt padding, new
tokens go right after the filled prefix of the ring instead and only that prefix is read). A
commit call (K tokens, commit=True) also copies them into the oldest ring slots. A fused call
(2K tokens, commit=True) does both at once: its first K tokens are the clean block just
finished, committed exactly as a commit call would, and its last K tokens are the next block
being denoised, which sees the ring as it is after that commit. In every case validity is
updated after the call (`advance`), so a block never sees its own keys twice.

Keys carry absolute rotary positions. Scores depend only on relative positions, so once the
ring wraps (sequences longer than the window) the cache equals a full recomputation under the
banded block-causal mask (`models.attention.BandedBlockCausalMask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _own_block(block_valid: Tensor | None, batch: int, K: int, device) -> Tensor:
    """(B, K, K) attention within a block: real tokens see real tokens, padding sees padding
    (so every row has a key and values stay finite; nobody reads padding outputs)."""
    if block_valid is None:
        return torch.ones(batch, K, K, dtype=torch.bool, device=device)
    return block_valid[:, :, None] == block_valid[:, None, :]


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
        slots = block_size + self.capacity + block_size
        self.shape = (n_layers, batch_size, n_heads, slots, head_dim)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        # validity of ring + current block (the slots a denoising call attends)
        self.valid = torch.zeros(
            batch_size, self.capacity + block_size, dtype=torch.bool, device=device
        )
        self.valid[:, self.capacity :] = True
        self.num_committed = 0  # blocks committed so far (host-side counter, no syncs)
        self._padded = False  # some committed block had prompt padding
        self._plan: tuple = ()  # made at layer 0 of a call, used by every layer (_plan_call)

    @property
    def slot(self) -> slice:
        """Ring slots (relative to the ring) the next committed block overwrites (the oldest
        block once full)."""
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
        """q, k, v: (B, H, n, d) with n = K (one block) or 2K (a clean block to commit, then
        the block being denoised) -> attention output (B, H, n, d). Layer 0 starts a call.

        commit: store the clean block's keys/values as the newest committed block (required
        for n = 2K). block_valid: (B, K) bool, False at prompt padding (n = K only)."""
        K = self.block_size
        n = q.shape[2]
        if n not in (K, 2 * K) or (n == 2 * K and not commit):
            raise ValueError(f"KV cache expects {K} tokens, or {2 * K} with commit")
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        if layer == 0:
            self._plan = self._plan_call(n, commit, block_valid)
        start, prev_at, cur_at, mask, in_place = self._plan
        keys, values = self.k[layer], self.v[layer]
        keys[:, :, cur_at : cur_at + K] = k[:, :, -K:]
        values[:, :, cur_at : cur_at + K] = v[:, :, -K:]
        if n == 2 * K:
            keys[:, :, prev_at : prev_at + K] = k[:, :, :K]
            values[:, :, prev_at : prev_at + K] = v[:, :, :K]
        out = F.scaled_dot_product_attention(
            q, keys[:, :, start : cur_at + K], values[:, :, start : cur_at + K], attn_mask=mask
        )
        if commit and not in_place:  # after attending: the block it replaces was visible
            ring = slice(K + self.slot.start, K + self.slot.stop)
            keys[:, :, ring] = k[:, :, :K]
            values[:, :, ring] = v[:, :, :K]
        return out

    def _plan_call(self, n: int, commit: bool, block_valid: Tensor | None) -> tuple:
        """Where this call's n new tokens go and which slots it attends (the same for every
        layer): (start, prev_at, cur_at, mask, in_place). Keys are slots [start, cur_at + K).

        Until the ring wraps, with no prompt padding, the committed slots are the prefix
        [K, K + filled): new tokens are written right after it (where the next commit puts
        them, so a commit needs no copy) and attention reads only the filled slots. Otherwise
        the layout of the module docstring with a validity mask."""
        K, cap = self.block_size, self.capacity
        filled = self.num_committed * K
        linear = filled + n <= cap + K and (not commit or filled < cap)
        if linear and block_valid is None and not self._padded:
            mask = None
            if n == 2 * K:  # the committed block does not see the next one
                mask = torch.ones(n, filled + n, dtype=torch.bool, device=self.valid.device)
                mask[:K, filled + K :] = False
            return K, K + filled, K + filled + n - K, mask, True
        return (0 if n == 2 * K else K, 0, K + cap, self._build_mask(n, block_valid), False)

    def _build_mask(self, n: int, block_valid: Tensor | None) -> Tensor | None:
        """(B, 1, n, keys) bool over the slots the call attends; None when all are visible."""
        K, cap = self.block_size, self.capacity
        B, device = self.valid.shape[0], self.valid.device
        ring = self.valid[:, None, :cap].expand(-1, K, -1)  # (B, K, cap)
        if n == K:
            if block_valid is None:  # here the ring has wrapped: every slot is filled
                return self.valid[:, None, None, :] if self._padded else None
            return torch.cat([ring, _own_block(block_valid, B, K, device)], dim=-1)[:, None]
        if block_valid is not None:
            raise ValueError("a fused commit takes generated blocks only (prefill prompts)")
        ones = torch.ones(B, K, K, dtype=torch.bool, device=device)
        none = torch.zeros(B, K, K, dtype=torch.bool, device=device)
        # the committed block: the ring as before the commit, itself, not the next block
        prev_rows = torch.cat([ones, ring, none], dim=-1)
        # the next block: the committed block (unless the window is one block), the ring
        # without the slot the commit overwrites (that block leaves the window), itself
        ring_after = ring.clone()
        ring_after[..., self.slot] = False
        cur_rows = torch.cat([none if cap == 0 else ones, ring_after, ones], dim=-1)
        return torch.cat([prev_rows, cur_rows], dim=1)[:, None]

    def advance(self, block_valid: Tensor | None = None) -> None:
        """Mark the block just committed as visible. block_valid: (B, K) bool (False for prompt
        padding), all True by default."""
        slot = self.slot
        if self.capacity:
            self.valid[:, slot] = True if block_valid is None else block_valid
        self._padded |= block_valid is not None
        self.num_committed += 1
