"""The KV cache of this backbone: models.kv_cache.KVCache plus the state the token shift, the
causal clean stream and prompt padding need."""

from __future__ import annotations

import torch
from torch import Tensor

from models.kv_cache import KVCache


class HFKVCache(KVCache):
    """models.kv_cache.KVCache plus what this backbone carries between calls:

    last_hidden: (B, 1, D) final hidden state of the last committed token (the token shift
      reads it for the first position of the next block), None before the first commit;
    pad_count: (B,) prompt padding committed so far (positions count real tokens);
    causal_commit: a committed block attends token-causally within itself (clean_attention
      "causal"), as the x_0 stream does in training; the ring and the block being denoised
      are as in KVCache."""

    def __init__(self, *args, causal_commit: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.causal_commit = causal_commit
        self.last_hidden: Tensor | None = None
        batch, device = self.valid.shape[0], self.valid.device
        self.pad_count = torch.zeros(batch, dtype=torch.long, device=device)

    def _plan_call(self, n: int, commit: bool, block_valid: Tensor | None) -> tuple:
        plan = super()._plan_call(n, commit, block_valid)
        K = self.block_size
        if not (commit and self.causal_commit) or K == 1:
            return plan
        start, prev_at, cur_at, mask, in_place = plan
        own = (prev_at if n == 2 * K else cur_at) - start  # the committed block's key columns
        device = self.valid.device
        if mask is None:
            mask = torch.ones(n, cur_at + K - start, dtype=torch.bool, device=device)
        else:  # (n, keys) or (B, 1, n or 1, keys)
            mask = mask.expand(*mask.shape[:-2], n, mask.shape[-1]).clone()
        tril = torch.ones(K, K, dtype=torch.bool, device=device).tril()
        mask[..., :K, own : own + K] &= tril
        return start, prev_at, cur_at, mask, in_place

    def advance(self, block_valid: Tensor | None = None) -> None:
        if block_valid is not None:
            self.pad_count += (~block_valid).sum(1)
        super().advance(block_valid)
