"""Reverse-process samplers (SPEC 4): the semi-autoregressive block sampler of BD3-LM/MDLM
(DDPM caching update, first-hitting, nucleus, KV cache, stop rules) and the AR sampler.

Samplers talk to the network through a `SamplingModel` (sampling_model.SamplingModel
implements it), never the LightningModule:
  logprobs(x (B, S), t (B,), num_last, key_valid, cache, commit, commit_previous, rows)
      -> (B, num_last, V) log-probabilities for the last `num_last` positions of x (SUBS for
      diffusion, next-token for AR); with a cache, x[:, -num_last:] is the only new input.
      commit: store that input in the cache (AR). commit_previous: the block of K tokens before
      it is clean and not cached yet: store it in the same call (a fused commit). rows: (B, k)
      ascending positions among the last num_last: only those rows, (B, k, V).
  commit(x, key_valid, cache) -> None: store the clean last block in the cache.
  new_cache(batch_size, block_size) -> KVCache.
All random draws come from one CPU `torch.Generator` in an order that does not depend on the
cache, so a seed fixes the samples whatever the device and whether the cache is on. Every
sequence of a batch has its own first-hitting clock, NFE counts, length and stop reason.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch
from torch import Tensor

from models.kv_cache import KVCache

GUMBEL_EPS = 1e-10
STOP_ENTROPY = 4.0  # nats: the reference's low-entropy stop threshold
ENTROPY_WINDOW = 256  # tokens the entropy rule looks at
UNMASK_ORDERS = ("random", "confidence")


class SamplingModel(Protocol):
    def logprobs(
        self,
        x: Tensor,
        t: Tensor,
        num_last: int,
        key_valid: Tensor | None,
        cache: KVCache | None,
        commit: bool = False,
        commit_previous: bool = False,
        rows: Tensor | None = None,
    ) -> Tensor: ...

    def commit(self, x: Tensor, key_valid: Tensor | None, cache: KVCache) -> None: ...

    def new_cache(self, batch_size: int, block_size: int) -> KVCache: ...


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """length: tokens to generate (the BOS counts when there is no prompt); block_size: K;
    num_steps: T (DDPM steps; first-hitting makes one call per token); context: the window the
    network sees, its trained length; stride: MDLM beyond its context appends `stride` new
    tokens per round after a first block of `block_size` (SPEC 4.2); var_length: stop at EOS
    or low entropy (SPEC 4.6); reject_low_entropy: flag fixed-length samples whose last 256
    tokens have entropy < 4 for resampling, as the reference does."""

    length: int
    block_size: int
    num_steps: int
    context: int
    bos_id: int
    mask_id: int
    eos_id: int
    first_hitting: bool = True
    nucleus_p: float = 1.0
    kv_cache: bool = False
    var_length: bool = False
    reject_low_entropy: bool = True
    stride: int | None = None
    # Fast first-hitting (default): draw each step's token only at the position(s) it commits,
    # by inverse CDF in float64 over those rows only, with the block's random numbers drawn
    # up front (no host sync per step). Same distribution as the reference draw (a Gumbel race
    # over every position of the block, kept with lazy_draws=False), other random numbers.
    lazy_draws: bool = True
    # Parallel decoding (first-hitting with lazy_draws): commit `tokens_per_step` masked
    # positions per model call (chosen uniformly), and/or also every masked position whose
    # most likely token has probability >= `confidence_threshold` (that token is committed).
    # tokens_per_step=1 and no threshold is exact first-hitting.
    tokens_per_step: int = 1
    confidence_threshold: float | None = None
    # Parallel decoding by an entropy budget (ours; stricter than the EB-sampler below): a
    # call commits its position(s) as above, then also the still-masked positions of lowest
    # entropy (of their nucleus-filtered distributions) while those extra entropies sum to at
    # most `entropy_bound` nats; every token is drawn from its distribution (no argmax).
    entropy_bound: float | None = None
    # The EB-sampler rule (Ben-Hamu et al. 2025), a position rule of its own: each call
    # commits the k masked positions of lowest entropy, k the largest with
    # (sum of their entropies) - (the largest of them) <= `eb_gamma` nats (k >= 1), every
    # token drawn from its nucleus-filtered distribution.
    eb_gamma: float | None = None
    # Which positions a call commits: "random" (uniform among the masked ones, first-hitting's
    # choice) or "confidence" (the masked positions whose most likely token is most probable,
    # as MaskGIT-style decoders do; not the exact sampler even at one token per step).
    unmask_order: str = "random"
    # KV cache: commit each finished block inside the next block's first denoising call (one
    # forward over 2K tokens) instead of by a pass of its own, when the model allows it
    # Same logits; False is the separate pass (benchmarks).
    fuse_commit: bool = True

    def __post_init__(self):
        if self.tokens_per_step < 1:
            raise ValueError(f"sampling.tokens_per_step={self.tokens_per_step} must be >= 1")
        if self.confidence_threshold is not None and not 0 < self.confidence_threshold <= 1:
            raise ValueError(
                f"sampling.confidence_threshold={self.confidence_threshold} must lie in (0, 1]"
            )
        if self.entropy_bound is not None and not self.entropy_bound > 0:
            raise ValueError(f"sampling.entropy_bound={self.entropy_bound} must be > 0")
        if self.eb_gamma is not None:
            if not self.eb_gamma >= 0:
                raise ValueError(f"sampling.eb_gamma={self.eb_gamma} must be >= 0")
            others = self.tokens_per_step > 1 or self.confidence_threshold is not None
            others |= self.entropy_bound is not None or self.unmask_order != "random"
            if others:
                raise ValueError(
                    "sampling.eb_gamma chooses the positions itself: leave tokens_per_step=1, "
                    "confidence_threshold, entropy_bound and unmask_order at their defaults"
                )
        if self.unmask_order not in UNMASK_ORDERS:
            raise ValueError(
                f"sampling.unmask_order={self.unmask_order!r}: valid are {UNMASK_ORDERS}"
            )
        parallel = self.tokens_per_step > 1 or self.confidence_threshold is not None
        parallel |= self.entropy_bound is not None or self.eb_gamma is not None
        if (parallel or self.unmask_order != "random") and not (
            self.first_hitting and self.lazy_draws
        ):
            raise ValueError(
                "parallel decoding and sampling.unmask_order need sampling.first_hitting and "
                "sampling.lazy_draws"
            )
        if self.num_steps < 1:
            raise ValueError(f"algo.T={self.num_steps}: sampling needs at least one step")
        if not 0 < self.nucleus_p <= 1:
            raise ValueError(f"sampling.nucleus_p={self.nucleus_p} must lie in (0, 1]")
        step = self.stride or self.block_size
        if self.length < self.block_size or (self.length - self.block_size) % step:
            raise ValueError(
                f"block_size={self.block_size} must divide the generation length "
                f"model.length={self.length}"
            )
        if self.context % self.block_size and self.stride is None:
            raise ValueError(f"block_size={self.block_size} must divide the window {self.context}")

    def blocks(self) -> list[int]:
        """Sizes of the successive blocks that make up `length`."""
        step = self.stride or self.block_size
        return [self.block_size] + [step] * ((self.length - self.block_size) // step)


@dataclasses.dataclass
class SampleOutput:
    tokens: Tensor  # (B, S) int64; row b is valid up to lengths[b] (after its prompt padding)
    lengths: Tensor  # (B,) tokens per sample, prompt included
    nfe_denoise: Tensor  # (B,) model calls that changed the sequence (the reference's NFE)
    nfe_total: Tensor  # (B,) denoising calls plus separate KV-cache commit passes
    stop_reason: list[str]  # "length" | "eos" | "low_entropy" | "rejected_low_entropy"
    prompt_pad: Tensor  # (B,) left padding in front of each row's prompt


# ----------------------------------------------------------------------------------------------
# Draws
# ----------------------------------------------------------------------------------------------
def _rand(shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


def sample_categorical(probs: Tensor, generator: torch.Generator) -> Tensor:
    """Exponential-race Gumbel-max: argmax p / E with E = 1e-10 - log(U + 1e-10), float64.
    probs: (..., V), need not be normalised."""
    race = GUMBEL_EPS - torch.log(_rand(tuple(probs.shape), generator, probs.device) + GUMBEL_EPS)
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


# ----------------------------------------------------------------------------------------------
# Stop rules (SPEC 4.6), per sequence
# ----------------------------------------------------------------------------------------------
def window_entropy(tokens: Tensor) -> Tensor:
    """(B, W) ids -> (B,) entropy (nats) of each row's unigram distribution."""
    counts = torch.zeros(tokens.shape[0], int(tokens.max()) + 1, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=counts.dtype))
    p = counts / tokens.shape[1]
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)


def apply_stop_rules(
    x: Tensor, gen_start: int, new_start: int, state: _State, cfg: SamplerConfig
) -> None:
    """Check the active sequences after tokens [new_start, S) were added.

    var_length: the first generated EOS ends a sequence (kept); entropy of the last 256 tokens
    below 4 ends it and drops those 256 tokens. Fixed length: low entropy marks the sequence for
    resampling when reject_low_entropy (the reference resamples the whole batch)."""
    S = x.shape[1]
    if cfg.var_length:
        is_eos = x[:, new_start:] == cfg.eos_id
        first_eligible = gen_start if gen_start else 1  # the BOS is not a stop
        if new_start < first_eligible:
            is_eos[:, : first_eligible - new_start] = False
        hit = is_eos.any(-1) & state.active
        if hit.any():
            first = is_eos.int().argmax(-1) + new_start
            for b in hit.nonzero().flatten().tolist():
                state.stop(b, int(first[b]) + 1, "eos")
    if S - gen_start > ENTROPY_WINDOW and (cfg.var_length or cfg.reject_low_entropy):
        low = (window_entropy(x[:, -ENTROPY_WINDOW:]) < STOP_ENTROPY) & state.active
        for b in low.nonzero().flatten().tolist():
            if cfg.var_length:
                state.stop(b, S - ENTROPY_WINDOW, "low_entropy")
            else:
                state.stop(b, S, "rejected_low_entropy")


@dataclasses.dataclass
class _State:
    active: Tensor  # (B,) bool
    lengths: Tensor  # (B,) int64
    reasons: list[str]

    def stop(self, b: int, length: int, reason: str) -> None:
        self.active[b] = False
        self.lengths[b] = length
        self.reasons[b] = reason


def _start(batch_size: int, prompt: Tensor | None, prompt_valid: Tensor | None, device):
    """Initial context: the left-padded prompt (B, P) and its key validity, or nothing."""
    if prompt is None:
        x = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return x, None, torch.zeros(batch_size, dtype=torch.long, device=device)
    valid = prompt_valid.to(device)
    return prompt.to(device), valid, (~valid).sum(-1)


def _extend_valid(key_valid: Tensor | None, n: int) -> Tensor | None:
    if key_valid is None:
        return None
    return torch.cat([key_valid, key_valid.new_ones(key_valid.shape[0], n)], dim=1)


def _prefill(model: SamplingModel, x: Tensor, valid: Tensor | None, cache, block: int) -> int:
    """Commit a prompt into the cache block by block; returns the number of commit passes."""
    for end in range(block, x.shape[1] + 1, block):
        model.commit(x[:, :end], None if valid is None else valid[:, :end], cache)
    return x.shape[1] // block


# ----------------------------------------------------------------------------------------------
# The semi-autoregressive block sampler (BD3-LM, MDLM)
# ----------------------------------------------------------------------------------------------
def _update_block(
    block: Tensor, p_x0: Tensor, t: Tensor, dt: float, cfg: SamplerConfig, generator
) -> Tensor:
    """One reverse step for the noisy block (SPEC 4.3). block: (B, K); t: (B,) float64.

    First-hitting: sample every position, commit one masked position per sequence (chosen
    uniformly). DDPM: q(x_s) puts p_x0 (1 - s/t) on tokens and s/t on the mask. Already
    unmasked positions are carried over either way."""
    masked = block == cfg.mask_id
    if cfg.first_hitting:
        proposal = sample_categorical(p_x0, generator)
        scores = _rand(tuple(block.shape), generator, block.device).masked_fill(~masked, -1.0)
        chosen = torch.zeros_like(masked).scatter_(-1, scores.argmax(-1, keepdim=True), True)
        return torch.where(chosen & masked, proposal, block)
    mask_prob = ((t - dt) / t).clamp(min=0.0)[:, None, None]  # s / t, (B, 1, 1)
    q_xs = p_x0 * (1 - mask_prob)
    q_xs[..., cfg.mask_id] = mask_prob[..., 0]
    return torch.where(masked, sample_categorical(q_xs, generator), block)


def _denoise_block(
    model: SamplingModel,
    context: Tensor,
    key_valid: Tensor | None,
    block: Tensor,
    cache: KVCache | None,
    cfg: SamplerConfig,
    generator: torch.Generator,
    active: Tensor,
    num_masked: int | None = None,
    commit_previous: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fill one block. Returns the clean block (B, K) and per-sequence NFE (B,).
    num_masked: the most masked positions any sequence starts with (host-side, if known).
    commit_previous: the last block of `context` is still to be committed to the cache; the
    first model call does it (a fused commit). The block must then start with a masked token
    (every block after the first does), so that there is a first call.

    First-hitting: each sequence draws its next unmask time t <- t u^(1/n) (n = its masked
    count) and unmasks one token per call. DDPM: T steps t_i = 1 - i/T, s = t_i - 1/T, so the
    last step unmasks everything left. p_x0 is reused while no sequence changed: exact because
    the network ignores t (no time conditioning)."""
    if cfg.first_hitting and cfg.lazy_draws:
        return _denoise_block_lazy(
            model, context, key_valid, block, cache, cfg, generator, active, num_masked,
            commit_previous,
        )  # fmt: skip
    B, K = block.shape
    T = cfg.num_steps
    t = torch.ones(B, dtype=torch.float64, device=block.device)
    nfe = torch.zeros(B, dtype=torch.long, device=block.device)
    valid = _extend_valid(key_valid, K)
    p_x0 = None
    for step in range(K if cfg.first_hitting else T):
        masked = block == cfg.mask_id
        if not masked.any():
            break
        if cfg.first_hitting:
            n = masked.sum(-1)
            u = _rand((B,), generator, block.device)
            t = torch.where(n > 0, t * u ** (1.0 / n.clamp(min=1)), t)
        else:
            t = torch.full_like(t, 1.0 - step / T)
        if p_x0 is None:
            x = torch.cat([context, block], dim=1)
            log_p = model.logprobs(x, t, K, valid, cache, commit_previous=commit_previous)
            commit_previous = False
            p_x0 = nucleus(log_p.double().exp(), cfg.nucleus_p)
        new_block = _update_block(block, p_x0, t, 1.0 / T, cfg, generator)
        changed = (new_block != block).any(-1)
        nfe += changed & active
        if changed.any():
            p_x0 = None
        block = new_block
    return block, nfe


def _denoise_block_lazy(
    model: SamplingModel,
    context: Tensor,
    key_valid: Tensor | None,
    block: Tensor,
    cache: KVCache | None,
    cfg: SamplerConfig,
    generator: torch.Generator,
    active: Tensor,
    num_masked: int | None,
    commit_previous: bool = False,
) -> tuple[Tensor, Tensor]:
    """First-hitting (and parallel decoding) with work only where tokens change.

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
    draws = _rand((steps, B, sum(sizes)), generator, device)
    n = masked.sum(-1)
    t = torch.ones(B, dtype=torch.float64, device=device)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    valid = _extend_valid(key_valid, K)
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
            block = _eb_commit(block, log_p, extra_u[0], gamma, cfg)
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
            new_block = _entropy_budget_commit(new_block, log_p, extra_u[0], bound, cfg)
        nfe += (n > 0) & active
        block = new_block
        masked = block == cfg.mask_id
        n = masked.sum(-1)
        if (log_threshold is not None or bound is not None) and not bool(masked.any()):
            break  # parallel commits can finish early (one host sync per step in these modes)
    return block, nfe


def _entropies(log_p: Tensor, block: Tensor, cfg: SamplerConfig) -> tuple[Tensor, Tensor]:
    """Nucleus-filtered float64 probabilities (B, K, V) and their entropies (B, K), +inf at
    positions that are not masked."""
    probs = nucleus(log_p.double().exp(), cfg.nucleus_p)
    q = probs / probs.sum(-1, keepdim=True)
    entropy = -torch.special.xlogy(q, q).sum(-1)
    return probs, entropy.masked_fill(block != cfg.mask_id, math.inf)


def _eb_commit(
    block: Tensor, log_p: Tensor, uniform: Tensor, gamma: float, cfg: SamplerConfig
) -> Tensor:
    """The EB-sampler rule: block (B, K), log_p (B, K, V), uniform (B, K). Commits the k
    lowest-entropy masked positions, k the largest with sum - max of their entropies <= gamma
    (in ascending order the max is the k-th), each token drawn from its row."""
    probs, entropy = _entropies(log_p, block, cfg)
    sorted_entropy, order = entropy.sort(dim=-1)
    excess = sorted_entropy.cumsum(-1) - sorted_entropy  # +inf - inf = nan past the masked
    within = torch.zeros_like(block, dtype=torch.bool)
    within.scatter_(1, order, excess <= gamma)
    return torch.where(within, sample_inverse_cdf(probs, uniform), block)


def _entropy_budget_commit(
    block: Tensor, log_p: Tensor, uniform: Tensor, bound: float, cfg: SamplerConfig
) -> Tensor:
    """block (B, K) after this call's commits; log_p (B, K, V); uniform (B, K) in [0, 1).
    Commits the still-masked positions in order of increasing entropy while their entropies
    sum to at most `bound` nats, each token drawn from its nucleus-filtered row."""
    probs, entropy = _entropies(log_p, block, cfg)
    sorted_entropy, order = entropy.sort(dim=-1)
    within = torch.zeros_like(block, dtype=torch.bool)
    within.scatter_(1, order, sorted_entropy.cumsum(-1) <= bound)
    return torch.where(within, sample_inverse_cdf(probs, uniform), block)


@torch.no_grad()
def semi_ar_sample(
    model: SamplingModel,
    batch_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: torch.device,
    prompt: Tensor | None = None,
    prompt_valid: Tensor | None = None,
    progress=None,
) -> SampleOutput:
    """Generate block by block, left to right (SPEC 4.2), optionally after a left-padded
    prompt (B, P) whose padding is False in prompt_valid. With cfg.kv_cache, each finished
    block is committed to the cache: inside the next block's first call when
    cfg.fuse_commit, else by an extra forward pass (counted in
    nfe_total)."""
    x, key_valid, pad = _start(batch_size, prompt, prompt_valid, device)
    gen_start = x.shape[1]
    cache = model.new_cache(batch_size, cfg.block_size) if cfg.kv_cache else None
    fuse = cache is not None and cfg.fuse_commit
    nfe_denoise = torch.zeros(batch_size, dtype=torch.long, device=device)
    nfe_total = torch.zeros_like(nfe_denoise)
    if cache is not None and x.shape[1]:
        nfe_total += _prefill(model, x, key_valid, cache, cfg.block_size)
    total = gen_start + cfg.length
    state = _State(
        torch.ones(batch_size, dtype=torch.bool, device=device),
        torch.full((batch_size,), total, dtype=torch.long, device=device),
        ["length"] * batch_size,
    )
    pending = False  # the last block of x is clean but not yet in the cache (fused commit)
    for K in cfg.blocks():
        block = torch.full((batch_size, K), cfg.mask_id, dtype=torch.long, device=device)
        num_masked = K
        if x.shape[1] == 0:
            block[:, 0] = cfg.bos_id
            num_masked = K - 1
        visible = cfg.context - K if cache is None and cfg.stride else x.shape[1]
        context = x[:, x.shape[1] - min(visible, x.shape[1]) :]
        valid = None if key_valid is None else key_valid[:, key_valid.shape[1] - context.shape[1] :]
        block, nfe = _denoise_block(
            model, context, valid, block, cache, cfg, generator, state.active, num_masked,
            pending,
        )  # fmt: skip
        nfe_denoise += nfe
        nfe_total += nfe
        new_start = x.shape[1]
        x = torch.cat([x, block], dim=1)
        key_valid = _extend_valid(key_valid, K)
        pending = fuse and x.shape[1] < total
        if cache is not None and x.shape[1] < total and not fuse:
            model.commit(x, key_valid, cache)
            nfe_total += state.active
        apply_stop_rules(x, gen_start, new_start, state, cfg)
        if progress is not None:
            progress(K)
        if not state.active.any():
            break
    return SampleOutput(x, state.lengths, nfe_denoise, nfe_total, state.reasons, pad)


@torch.no_grad()
def ar_sample(
    model: SamplingModel,
    batch_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: torch.device,
    prompt: Tensor | None = None,
    prompt_valid: Tensor | None = None,
    progress=None,
) -> SampleOutput:
    """Ancestral next-token sampling with nucleus and Gumbel-max (SPEC 4.4). With a cache,
    each step feeds only the newest token (and commits it); without, the network re-reads the
    sequence under the same sliding-window causal mask. NFE = tokens generated."""
    x, key_valid, pad = _start(batch_size, prompt, prompt_valid, device)
    if x.shape[1] == 0:
        x = torch.full((batch_size, 1), cfg.bos_id, dtype=torch.long, device=device)
    gen_start = x.shape[1] if prompt is not None else 0
    total = gen_start + cfg.length
    cache = model.new_cache(batch_size, 1) if cfg.kv_cache else None
    nfe = torch.zeros(batch_size, dtype=torch.long, device=device)
    if cache is not None and x.shape[1] > 1:
        _prefill(model, x[:, :-1], None if key_valid is None else key_valid[:, :-1], cache, 1)
    state = _State(
        torch.ones(batch_size, dtype=torch.bool, device=device),
        torch.full((batch_size,), total, dtype=torch.long, device=device),
        ["length"] * batch_size,
    )
    zero_t = torch.zeros(batch_size, dtype=torch.float64, device=device)
    while x.shape[1] < total:
        log_p = model.logprobs(x, zero_t, 1, key_valid, cache, commit=cache is not None)
        probs = nucleus(log_p[:, -1].double().exp(), cfg.nucleus_p)
        if cfg.lazy_draws:  # one uniform per sequence (inverse CDF) instead of V Gumbels
            token = sample_inverse_cdf(probs, _rand((batch_size,), generator, device))
        else:
            u = _rand(tuple(probs.shape), generator, device)
            gumbel = -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)
            token = (probs.log() + gumbel).argmax(-1)
        nfe += state.active
        x = torch.cat([x, token[:, None]], dim=1)
        key_valid = _extend_valid(key_valid, 1)
        apply_stop_rules(x, gen_start, x.shape[1] - 1, state, cfg)
        if progress is not None:
            progress(1)
        if not state.active.any():
            break
    return SampleOutput(x, state.lengths, nfe, nfe.clone(), state.reasons, pad)
