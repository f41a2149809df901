"""Reverse-process samplers (SPEC 4): the semi-autoregressive block sampler of BD3-LM/MDLM
(DDPM caching update, first-hitting, nucleus) and the AR sampler.

Samplers take a denoiser callable, not the LightningModule:
  denoise(x (B, S), t (B,), num_last) -> log-probabilities (B, num_last, V) for the last
  `num_last` positions of x (SUBS log-probs for diffusion, next-token log-probs for AR).
All random draws come from one CPU `torch.Generator`, so a seed fixes the samples whatever the
device. Every sequence of a batch has its own first-hitting clock and NFE count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, int], Tensor]
GUMBEL_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """length: tokens per sample (BOS included); block_size: K; num_steps: T (> 0);
    context: the window the network sees (its trained length); first_hitting: unmask exactly
    one token per model call; nucleus_p in (0, 1]."""

    length: int
    block_size: int
    num_steps: int
    context: int
    bos_id: int
    mask_id: int
    first_hitting: bool = True
    nucleus_p: float = 1.0

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"algo.T={self.num_steps}: sampling needs at least one step")
        if not 0 < self.nucleus_p <= 1:
            raise ValueError(f"sampling.nucleus_p={self.nucleus_p} must lie in (0, 1]")
        if self.length % self.block_size:
            raise ValueError(
                f"block_size={self.block_size} must divide the generation length "
                f"model.length={self.length}"
            )


@dataclasses.dataclass
class SampleOutput:
    tokens: Tensor  # (B, length) int64
    nfe: Tensor  # (B,) model calls that changed the sequence (the reference's NFE)


def _rand(shape: tuple[int, ...], generator: torch.Generator, device, dtype=torch.float64):
    return torch.rand(shape, generator=generator, dtype=dtype).to(device)


def sample_categorical(probs: Tensor, generator: torch.Generator) -> Tensor:
    """Exponential-race Gumbel-max: argmax p / E with E = 1e-10 - log(U + 1e-10), float64.
    probs: (..., V), need not be normalised."""
    u = _rand(tuple(probs.shape), generator, probs.device)
    race = GUMBEL_EPS - torch.log(u + GUMBEL_EPS)
    return (probs.double() / race).argmax(dim=-1)


def nucleus(probs: Tensor, p: float) -> Tensor:
    """Top-p filtering as the reference does it (SPEC 4.5): keep the tokens whose cumulative
    probability is <= p, always the top-1, and renormalise. The token that crosses p is dropped
    (unlike textbook top-p). probs: (..., V) float64."""
    if p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(dim=-1) <= p
    keep[..., 0] = True
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def _denoise_block(denoise: Denoiser, window: Tensor, t: Tensor, cfg: SamplerConfig) -> Tensor:
    """p_theta(x_0) for the last block of the window: (B, K, V) float64 after nucleus."""
    log_probs = denoise(window, t, cfg.block_size)
    return nucleus(log_probs.double().exp(), cfg.nucleus_p)


def _update_block(
    block: Tensor,
    p_x0: Tensor,
    t: Tensor,
    dt: float,
    cfg: SamplerConfig,
    generator: torch.Generator,
) -> Tensor:
    """One reverse step for the noisy block (SPEC 4.3). block: (B, K); t: (B,) float64.

    First-hitting: sample every position, commit one masked position per sequence (chosen
    uniformly). DDPM: q(x_s) puts p_x0 (1 - s/t) on tokens and s/t on the mask. Already
    unmasked positions are carried over either way.
    """
    masked = block == cfg.mask_id
    if cfg.first_hitting:
        proposal = sample_categorical(p_x0, generator)
        scores = _rand(tuple(block.shape), generator, block.device).masked_fill(~masked, -1.0)
        chosen = torch.zeros_like(masked).scatter_(-1, scores.argmax(-1, keepdim=True), True)
        chosen &= masked
        return torch.where(chosen, proposal, block)
    mask_prob = ((t - dt) / t).clamp(min=0.0)[:, None, None]  # s / t, (B, 1, 1)
    q_xs = p_x0 * (1 - mask_prob)
    q_xs[..., cfg.mask_id] = mask_prob[..., 0]
    proposal = sample_categorical(q_xs, generator)
    return torch.where(masked, proposal, block)


@torch.no_grad()
def semi_ar_sample(
    denoise: Denoiser,
    batch_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: torch.device,
) -> SampleOutput:
    """Generate `cfg.length` tokens block by block, left to right (SPEC 4.2).

    Each block starts fully masked (the first one with BOS at position 0) and is denoised
    within a window of the last `cfg.context` tokens. First-hitting: each sequence draws its
    next unmask time t <- t u^(1/n) (n = its masked count) and unmasks one token per call.
    DDPM: T steps t_i = 1 - i/T, s = t_i - 1/T, so the last step unmasks everything left.
    p_x0 is reused while no sequence changed: exact because the network ignores t.
    """
    K, T = cfg.block_size, cfg.num_steps
    x = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    nfe = torch.zeros(batch_size, dtype=torch.long, device=device)
    dt = 1.0 / T
    for _ in range(cfg.length // K):
        block = torch.full((batch_size, K), cfg.mask_id, dtype=torch.long, device=device)
        if x.shape[1] == 0:
            block[:, 0] = cfg.bos_id
        context = x[:, max(x.shape[1] + K - cfg.context, 0) :]
        t = torch.ones(batch_size, dtype=torch.float64, device=device)
        p_x0 = None
        for step in range(K if cfg.first_hitting else T):  # first-hitting: one token a step
            masked = block == cfg.mask_id
            if not masked.any():
                break
            if cfg.first_hitting:
                num_masked = masked.sum(-1)
                u = _rand((batch_size,), generator, device)
                t = torch.where(num_masked > 0, t * u ** (1.0 / num_masked.clamp(min=1)), t)
            else:
                t = torch.full_like(t, 1.0 - step / T)
            if p_x0 is None:
                p_x0 = _denoise_block(denoise, torch.cat([context, block], dim=1), t, cfg)
            new_block = _update_block(block, p_x0, t, dt, cfg, generator)
            changed = (new_block != block).any(-1)
            nfe += changed
            if changed.any():
                p_x0 = None
            block = new_block
        x = torch.cat([x, block], dim=1)
    return SampleOutput(tokens=x, nfe=nfe)


@torch.no_grad()
def ar_sample(
    denoise: Denoiser,
    batch_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: torch.device,
) -> SampleOutput:
    """Ancestral next-token sampling with nucleus and Gumbel-max, window `cfg.context`
    (SPEC 4.4). NFE = length - 1 per sequence."""
    x = torch.full((batch_size, cfg.length), cfg.bos_id, dtype=torch.long, device=device)
    zero_t = torch.zeros(batch_size, dtype=torch.float64, device=device)
    for i in range(cfg.length - 1):
        window = x[:, max(i + 1 - cfg.context, 0) : i + 1]
        log_probs = denoise(window, zero_t, 1)[:, -1].double()
        probs = nucleus(log_probs.exp(), cfg.nucleus_p)
        u = _rand(tuple(probs.shape), generator, device)
        gumbel = -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)
        x[:, i + 1] = (probs.log() + gumbel).argmax(-1)
    nfe = torch.full((batch_size,), cfg.length - 1, dtype=torch.long, device=device)
    return SampleOutput(tokens=x, nfe=nfe)
