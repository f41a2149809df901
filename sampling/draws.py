"""Random draws of the samplers: uniforms from one CPU generator, the categorical (an
exponential race), inverse-CDF draws and the nucleus (top-p) filter."""

from __future__ import annotations

import torch
from torch import Tensor

GUMBEL_EPS = 1e-10


def uniforms(shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


def sample_categorical(probs: Tensor, generator: torch.Generator) -> Tensor:
    """Exponential-race Gumbel-max: argmax p / E with E = 1e-10 - log(U + 1e-10), float64.
    probs: (..., V), need not be normalised."""
    race = GUMBEL_EPS - torch.log(
        uniforms(tuple(probs.shape), generator, probs.device) + GUMBEL_EPS
    )
    return (probs.double() / race).argmax(dim=-1)


def sample_inverse_cdf(probs: Tensor, uniform: Tensor) -> Tensor:
    """One draw per row from probs (..., V) (float64, need not be normalised) given one
    uniform (...,) in [0, 1) per row: the first index whose cumulative mass exceeds u * total.
    Zero-probability entries are never returned."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[..., -1:]
    target = torch.minimum(uniform[..., None] * total, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def nucleus(probs: Tensor, p: float) -> Tensor:
    """Top-p filtering as the reference does it: keep the tokens whose cumulative
    probability is <= p, always the top-1, and renormalise. The token that crosses p is dropped
    (unlike textbook top-p). probs: (..., V) float64."""
    if p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(dim=-1) <= p
    keep[..., 0] = True
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return kept / kept.sum(dim=-1, keepdim=True)
