"""The semi-autoregressive block sampler of BD3-LM and MDLM (the paper's Algorithm 2): blocks
left to right, each filled by first-hitting (sampling/first_hitting.py) or by T steps of the
DDPM caching update (p_theta(x_0 | x_t) reused while no token changes when t does not reach
the network, where that is exact), with the KV cache of committed blocks and the stop rules.

All random draws come from one CPU `torch.Generator` in an order that does not depend on the
cache, so a seed fixes the samples whatever the device and whether the cache is on. Every
sequence of a batch has its own first-hitting clock, NFE counts, length and stop reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.kv_cache import KVCache
from sampling.config import SampleOutput, SamplerConfig
from sampling.context import extend_valid, prefill, start_context
from sampling.denoiser import Denoiser
from sampling.draws import nucleus, sample_categorical
from sampling.first_hitting import denoise_first_hitting
from sampling.stops import SequenceState, apply_stop_rules


def update_block(
    block: Tensor, p_x0: Tensor, t: Tensor, dt: float, cfg: SamplerConfig, generator
) -> Tensor:
    """One DDPM reverse step for the noisy block (paper Algorithm 2). block: (B, K); t: (B,)
    float64. q(x_s) puts p_x0 (1 - s/t) on tokens and s/t on the mask; already unmasked
    positions are carried over."""
    masked = block == cfg.mask_id
    mask_prob = ((t - dt) / t).clamp(min=0.0)[:, None, None]  # s / t, (B, 1, 1)
    q_xs = p_x0 * (1 - mask_prob)
    q_xs[..., cfg.mask_id] = mask_prob[..., 0]
    return torch.where(masked, sample_categorical(q_xs, generator), block)


def denoise_block(
    model: Denoiser,
    context: Tensor,
    key_valid: Tensor | None,
    block: Tensor,
    cache: KVCache | None,
    cfg: SamplerConfig,
    generator: torch.Generator,
    active: Tensor,
    num_masked: int | None = None,
    commit_previous: bool = False,
    draft=None,
) -> tuple[Tensor, Tensor]:
    """Fill one block. Returns the clean block (B, K) and per-sequence NFE (B,).
    num_masked: the most masked positions any sequence starts with (host-side, if known).
    commit_previous: the last block of `context` is still to be committed to the cache; the
    first model call does it (a fused commit). The block must then start with a masked token
    (every block after the first does), so that there is a first call.
    draft(block): called after each step that changed the block, with its state (B, K)
    (positions still masked hold the mask id).

    First-hitting: sampling/first_hitting.py. DDPM: T steps t_i = 1 - i/T, s = t_i - 1/T, so
    the last step unmasks everything left. p_x0 is reused while no sequence changed, which is
    exact only when the network ignores t: a time-conditioned network
    (`model.time_conditioned`, True when the denoiser does not say) is called at every step.
    NFE counts, per sequence, the calls that changed it (the reference's count, as for
    first-hitting) and, for a time-conditioned network, every call made while it still had a
    masked position (each of those steps draws from its own fresh prediction)."""
    if cfg.first_hitting:
        return denoise_first_hitting(
            model, context, key_valid, block, cache, cfg, generator, active, num_masked,
            commit_previous, draft,
        )  # fmt: skip
    B, K = block.shape
    T = cfg.num_steps
    t = torch.ones(B, dtype=torch.float64, device=block.device)
    nfe = torch.zeros(B, dtype=torch.long, device=block.device)
    valid = extend_valid(key_valid, K)
    reads_t = getattr(model, "time_conditioned", True)
    p_x0 = None
    for step in range(T):
        if not (block == cfg.mask_id).any():
            break
        t = torch.full_like(t, 1.0 - step / T)
        if p_x0 is None:
            x = torch.cat([context, block], dim=1)
            log_p = model.logprobs(x, t, K, valid, cache, commit_previous=commit_previous)
            commit_previous = False
            p_x0 = nucleus(log_p.double().exp(), cfg.nucleus_p)
        masked = (block == cfg.mask_id).any(-1)
        new_block = update_block(block, p_x0, t, 1.0 / T, cfg, generator)
        changed = (new_block != block).any(-1)
        nfe += (changed | (masked & reads_t)) & active
        if changed.any() and draft is not None:
            draft(new_block)
        if changed.any() or reads_t:
            p_x0 = None  # a new x_t, or the next step's t, changes p_theta(x_0 | x_t)
        block = new_block
    return block, nfe


@torch.no_grad()
def semi_ar_sample(
    model: Denoiser,
    batch_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: torch.device,
    prompt: Tensor | None = None,
    prompt_valid: Tensor | None = None,
    progress=None,
) -> SampleOutput:
    """Generate block by block, left to right (paper Algorithm 2), optionally after a left-padded
    prompt (B, P) whose padding is False in prompt_valid. With cfg.kv_cache, each finished
    block is committed to the cache: inside the next block's first call when
    cfg.fuse_commit, else by an extra forward pass (counted in
    nfe_total). progress(n, committed): called after each block with its n tokens (B, n)
    (every sampler of sampling/ calls it so: units of progress, and the tokens just committed
    when there are any). A `progress.draft(block)` method, when there is one, is called after
    each denoising step that changed the block, with its state (B, K) (masked positions hold
    the mask id; for streamers' put_draft)."""
    x, key_valid, pad = start_context(batch_size, prompt, prompt_valid, device)
    gen_start = x.shape[1]
    cache = model.new_cache(batch_size, cfg.block_size) if cfg.kv_cache else None
    fuse = cache is not None and cfg.fuse_commit
    nfe_denoise = torch.zeros(batch_size, dtype=torch.long, device=device)
    nfe_total = torch.zeros_like(nfe_denoise)
    if cache is not None and x.shape[1]:
        nfe_total += prefill(model, x, key_valid, cache, cfg.block_size)
    total = gen_start + cfg.length
    state = SequenceState(
        torch.ones(batch_size, dtype=torch.bool, device=device),
        torch.full((batch_size,), total, dtype=torch.long, device=device),
        ["length"] * batch_size,
    )
    pending = False  # the last block of x is clean but not yet in the cache (fused commit)
    draft = getattr(progress, "draft", None)
    for K in cfg.blocks():
        block = torch.full((batch_size, K), cfg.mask_id, dtype=torch.long, device=device)
        num_masked = K
        if x.shape[1] == 0:
            block[:, 0] = cfg.bos_id
            num_masked = K - 1
        visible = cfg.context - K if cache is None and cfg.stride else x.shape[1]
        context = x[:, x.shape[1] - min(visible, x.shape[1]) :]
        valid = None if key_valid is None else key_valid[:, key_valid.shape[1] - context.shape[1] :]
        block, nfe = denoise_block(
            model, context, valid, block, cache, cfg, generator, state.active, num_masked,
            pending, draft,
        )  # fmt: skip
        nfe_denoise += nfe
        nfe_total += nfe
        new_start = x.shape[1]
        x = torch.cat([x, block], dim=1)
        key_valid = extend_valid(key_valid, K)
        pending = fuse and x.shape[1] < total
        if cache is not None and x.shape[1] < total and not fuse:
            model.commit(x, key_valid, cache)
            nfe_total += state.active
        apply_stop_rules(x, gen_start, new_start, state, cfg)
        if progress is not None:
            progress(K, x[:, -K:])
        if not state.active.any():
            break
    return SampleOutput(x, state.lengths, nfe_denoise, nfe_total, state.reasons, pad)
