"""The context a sampler starts from: a left-padded prompt and its key validity, and the
prompt's commit into a KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from sampling.denoiser import Denoiser


def start_context(batch_size: int, prompt: Tensor | None, prompt_valid: Tensor | None, device):
    """Initial context: the left-padded prompt (B, P) and its key validity, or nothing."""
    if prompt is None:
        x = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return x, None, torch.zeros(batch_size, dtype=torch.long, device=device)
    valid = prompt_valid.to(device)
    return prompt.to(device), valid, (~valid).sum(-1)


def extend_valid(key_valid: Tensor | None, n: int) -> Tensor | None:
    if key_valid is None:
        return None
    return torch.cat([key_valid, key_valid.new_ones(key_valid.shape[0], n)], dim=1)


def prefill(model: Denoiser, x: Tensor, valid: Tensor | None, cache, block: int) -> int:
    """Commit a prompt into the cache block by block; returns the number of commit passes."""
    for end in range(block, x.shape[1] + 1, block):
        model.commit(x[:, :end], None if valid is None else valid[:, :end], cache)
    return x.shape[1] // block
