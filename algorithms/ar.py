"""The autoregressive baseline: next-token cross-entropy under causal attention,
with the mask token's logit pushed to -1e6 so it is never predicted."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from algorithms.base import (
    NEG_INF,
    Capabilities,
    DoubleLengthCrop,
    Layout,
    Loss,
    Network,
    Objective,
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
class Autoregressive(Objective):
    mask_id: int
    seq_len: int
    block_size: int = 1
    ignore_bos: bool = False
    crop: DoubleLengthCrop | None = None  # text8-crop: 2L training rows

    train_layout = Layout(mask=CausalMask())
    sampler = "ar"  # next-token sampling
    capabilities = Capabilities(
        kv_cache=True,
        prompts=True,
        ppl_eval=True,
        clip_interval=False,
        two_stream=False,
        time_conditioned=False,
        reencodes_window=False,
        # one token per call: no first-hitting, parallel decoding or separate commit (each
        # call caches its token)
        sampling_keys=SamplingKeys(
            frozenset({"var_length", "reject_low_entropy", "nucleus_p", "reencode_context"})
        ),
    )
    sampling_keys = capabilities.sampling_keys

    def sampling_blocks(self, window: int, length: int) -> tuple[int, int | None]:
        """(K, stride) of the sampler: one token at a time, a sliding window."""
        return 1, None

    def sample_mask(self, window: int, reencode: bool):
        """Causal attention limited to the last `window` tokens (re-encoded: plain causal)."""
        return CausalMask() if reencode else BandedBlockCausalMask(1, window)

    def eval_interval(self) -> tuple[float, float]:
        """The exact NLL: no diffusion time (reported as t = 1, like BD3-LM's K = 1)."""
        return 1.0, 1.0

    def loss(
        self,
        network: Network,
        x0: Tensor,
        attention_mask: Tensor,
        eps_min: Tensor,
        eps_max: Tensor,
        *,
        train: bool,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> Loss:
        """Input x0[:, :-1], target x0[:, 1:], weights attention_mask[:, 1:] (with crop and rows
        of 2L: the window's input, target and mask). eps are unused."""
        window = self.crop_rows(x0, attention_mask, generator)
        if window is None:
            inputs, target, weights = x0[:, :-1], x0[:, 1:], attention_mask[:, 1:]
        else:
            inputs, target, weights = window
        logits = network(inputs, None, self.train_layout).float()
        logits = logits.index_fill(-1, torch.tensor([self.mask_id], device=x0.device), NEG_INF)
        # cross_entropy = -log_softmax gathered at the target, with a fused backward
        nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        return reduce_loss(nll.view_as(target), weights, self.ignore_bos, train)

    def log_probs(self, logits: Tensor, x_last: Tensor) -> Tensor:
        """Next-token log-probabilities (ar_log_probs); x_last is not read."""
        return ar_log_probs(logits, self.mask_id)
