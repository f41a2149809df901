"""First-hitting sampling of one block (Zheng et al.; the paper's sampler) and the parallel
decoding rules on top of it: several tokens per call, a confidence threshold, our entropy
budget, the EB-sampler rule and confidence order. Work is done only where tokens change: each
call draws tokens at the positions it commits, by inverse CDF over their rows."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.kv_cache import KVCache
from sampling.config import SamplerConfig
from sampling.context import extend_valid
from sampling.denoiser import Denoiser
from sampling.draws import nucleus, sample_inverse_cdf, uniforms


def denoise_first_hitting(
    model: Denoiser,
    context: Tensor,
    key_valid: Tensor | None,
    block: Tensor,
    cache: KVCache | None,
    cfg: SamplerConfig,
    generator: torch.Generator,
    active: Tensor,
    num_masked: int | None,
    commit_previous: bool = False,
    draft=None,
) -> tuple[Tensor, Tensor]:
    """First-hitting (and parallel decoding) with work only where tokens change. draft(block):
    called after each step with the block's state (B, K) (see sampling.block.denoise_block).

    Per call: t <- t u^(1/n) per sequence; the position(s) to commit are the largest of uniform
    scores over the masked positions (a uniform choice); the token there is drawn by inverse
    CDF from its (nucleus-filtered) float64 row, one uniform each. All uniforms of the block,
    (steps, B, 1 + K + k), plus K per step for cfg.entropy_bound, are drawn in one call before
    its first step, so the number of draws depends only on the block (not on the cache or the
    device) and no step waits on the host (except for the early stop of the parallel rules).
    """
    B, K = block.shape
    device = block.device
    k = min(cfg.tokens_per_step, K)
    threshold = cfg.confidence_threshold
    masked = block == cfg.mask_id
    if num_masked is None:
        num_masked = int(masked.sum(-1).max())
    steps = -(-num_masked // k)
    if steps == 0:
        return block, torch.zeros(B, dtype=torch.long, device=device)
    bound, gamma = cfg.entropy_bound, cfg.eb_gamma
    sizes = (1, K, k) + (() if bound is None and gamma is None else (K,))
    draws = uniforms((steps, B, sum(sizes)), generator, device)
    n = masked.sum(-1)
    t = torch.ones(B, dtype=torch.float64, device=device)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    valid = extend_valid(key_valid, K)
    log_threshold = None if threshold is None else math.log(threshold)
    by_confidence = cfg.unmask_order == "confidence"
    for step in range(steps):
        u, scores, token_u, *extra_u = draws[step].split(sizes, dim=-1)
        t = torch.where(n > 0, t * u[:, 0] ** (1.0 / n.clamp(min=1)), t)
        x = torch.cat([context, block], dim=1)
        fused = commit_previous and step == 0
        log_p = None
        if by_confidence or log_threshold is not None or bound is not None or gamma is not None:
            log_p = model.logprobs(x, t, K, valid, cache, commit_previous=fused)  # (B, K, V)
            best, guess = log_p.max(dim=-1)  # the nucleus keeps the top-1, so argmax is kept
        if gamma is not None:
            block = eb_commit(block, log_p, extra_u[0], gamma, cfg)
            if draft is not None:
                draft(block)
            nfe += (n > 0) & active
            masked = block == cfg.mask_id
            n = masked.sum(-1)
            if not bool(masked.any()):
                break
            continue
        if by_confidence:
            scores = best.double()
        scores = scores.masked_fill(~masked, -math.inf)
        # k == 1: argmax (the exact sampler when random); else the k best masked positions
        if k == 1:
            pos = scores.argmax(-1, keepdim=True)
        else:
            pos = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        take = masked.gather(1, pos)
        if log_p is None:  # only the committed rows need the output layer
            rows = model.logprobs(x, t, K, valid, cache, commit_previous=fused, rows=pos)
        else:
            rows = log_p.gather(1, pos[..., None].expand(-1, -1, log_p.shape[-1]))  # (B, k, V)
        probs = nucleus(rows.double().exp(), cfg.nucleus_p)
        tokens = sample_inverse_cdf(probs, token_u)
        new_block = block.scatter(1, pos, torch.where(take, tokens, block.gather(1, pos)))
        if log_threshold is not None:
            sure = (best >= log_threshold) & (new_block == cfg.mask_id)
            new_block = torch.where(sure, guess, new_block)
        if bound is not None:
            new_block = entropy_budget_commit(new_block, log_p, extra_u[0], bound, cfg)
        nfe += (n > 0) & active
        block = new_block
        if draft is not None:
            draft(block)
        masked = block == cfg.mask_id
        n = masked.sum(-1)
        if (log_threshold is not None or bound is not None) and not bool(masked.any()):
            break  # parallel commits can finish early (one host sync per step in these modes)
    return block, nfe


def entropies(log_p: Tensor, block: Tensor, cfg: SamplerConfig) -> tuple[Tensor, Tensor]:
    """Nucleus-filtered float64 probabilities (B, K, V) and their entropies (B, K), +inf at
    positions that are not masked."""
    probs = nucleus(log_p.double().exp(), cfg.nucleus_p)
    q = probs / probs.sum(-1, keepdim=True)
    entropy = -torch.special.xlogy(q, q).sum(-1)
    return probs, entropy.masked_fill(block != cfg.mask_id, math.inf)


def eb_commit(
    block: Tensor, log_p: Tensor, uniform: Tensor, gamma: float, cfg: SamplerConfig
) -> Tensor:
    """The EB-sampler rule: block (B, K), log_p (B, K, V), uniform (B, K). Commits the k
    lowest-entropy masked positions, k the largest with sum - max of their entropies <= gamma
    (in ascending order the max is the k-th), each token drawn from its row."""
    probs, entropy = entropies(log_p, block, cfg)
    sorted_entropy, order = entropy.sort(dim=-1)
    excess = sorted_entropy.cumsum(-1) - sorted_entropy  # +inf - inf = nan past the masked
    within = torch.zeros_like(block, dtype=torch.bool)
    within.scatter_(1, order, excess <= gamma)
    return torch.where(within, sample_inverse_cdf(probs, uniform), block)


def entropy_budget_commit(
    block: Tensor, log_p: Tensor, uniform: Tensor, bound: float, cfg: SamplerConfig
) -> Tensor:
    """block (B, K) after this call's commits; log_p (B, K, V); uniform (B, K) in [0, 1).
    Commits the still-masked positions in order of increasing entropy while their entropies
    sum to at most `bound` nats, each token drawn from its nucleus-filtered row."""
    probs, entropy = entropies(log_p, block, cfg)
    sorted_entropy, order = entropy.sort(dim=-1)
    within = torch.zeros_like(block, dtype=torch.bool)
    within.scatter_(1, order, sorted_entropy.cumsum(-1) <= bound)
    return torch.where(within, sample_inverse_cdf(probs, uniform), block)
