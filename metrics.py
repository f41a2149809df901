"""Evaluation numbers that are not a model's own loss: per-sample entropy and the unigram
baseline the demo compares its perplexity against."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample."""
    counts = torch.tensor(list(Counter(tokens).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def unigram_perplexity(train_ids: Tensor, eval_ids: Tensor, vocab_size: int) -> float:
    """Perplexity of `eval_ids` under a unigram model fitted on `train_ids` with add-one
    (Laplace) smoothing over `vocab_size` symbols. Both are integer tensors of any shape."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return math.exp(-log_p[eval_ids.flatten()].mean().item())
