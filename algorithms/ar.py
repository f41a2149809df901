"""The autoregressive baseline: next-token cross-entropy under causal attention,
with the mask token's logit pushed to -1e6 so it is never predicted."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from algorithms.base import (
    NEG_INF,
    DoubleLengthCrop,
    Layout,
    Loss,
    Network,
    SamplingKeys,
    Shard,
    reduce_loss,
)
from models.attention import BandedBlockCausalMask, CausalMask


def ar_log_probs(logits: Tensor, mask_id: int) -> Tensor:
    """(B, S, V) logits -> float32 log-probabilities with the mask token excluded."""
    mask_column = torch.tensor([mask_id], device=logits.device)
    return torch.log_softmax(logits.float().index_fill(-1, mask_column, NEG_INF), dim=-1)


@dataclasses.dataclass
class Autoregressive:
    mask_id: int
    seq_len: int
    block_size: int = 1
    ignore_bos: bool = False
    crop: DoubleLengthCrop | None = None  # text8-crop: 2L training rows

    train_layout = Layout(mask=CausalMask())
    sampler = "ar"  # next-token sampling
    # one token per call: no first-hitting, parallel decoding or separate commit (each call
    # caches its token)
    sampling_keys = SamplingKeys(
        frozenset({"var_length", "reject_low_entropy", "nucleus_p", "reencode_context"})
    )
    supports_kv_cache = True
    supports_prompts = True

    def sampling_blocks(self, window: int, length: int) -> tuple[int, int | None]:
        """(K, stride) of the sampler: one token at a time, a sliding window."""
        return 1, None

    def sample_mask(self, window: int, reencode: bool):
        """Causal attention limited to the last `window` tokens (re-encoded: plain causal)."""
        return CausalMask() if reencode else BandedBlockCausalMask(1, window)

    def eval_interval(self) -> tuple[float, float]:
        return 1.0, 1.0

    def loss(
        self,
        network: Network,
        x0: Tensor,
        attention_mask: Tensor,
        eps_min: Tensor,
        eps_max: Tensor,
        train: bool,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> Loss:
        """Input x0[:, :-1], target x0[:, 1:], weights attention_mask[:, 1:]. eps are unused."""
        if self.crop is not None and x0.shape[1] == 2 * self.seq_len:
            inputs, target, attention_mask = self.crop(x0, attention_mask, self.seq_len, generator)
            attention_mask = torch.cat([attention_mask[:, :1], attention_mask], dim=1)
        else:
            inputs, target = x0[:, :-1], x0[:, 1:]
        logits = network(inputs, None, self.train_layout).float()
        logits = logits.index_fill(-1, torch.tensor([self.mask_id], device=x0.device), NEG_INF)
        # cross_entropy = -log_softmax gathered at the target, with a fused backward
        nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        return reduce_loss(nll.view_as(target), attention_mask[:, 1:], self.ignore_bos, train)
