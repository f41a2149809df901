"""The sampler's configuration and output (every sampler of the package reads one)."""

from __future__ import annotations

import dataclasses

from torch import Tensor

UNMASK_ORDERS = ("random", "confidence")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """length: tokens to generate (the BOS counts when there is no prompt); block_size: K;
    num_steps: T (DDPM steps; first-hitting makes one call per token); context: the window the
    network sees, its trained length; stride: MDLM beyond its context appends `stride` new
    tokens per round after a first block of `block_size` (paper Algorithm 2);
    var_length: stop at EOS or low entropy; reject_low_entropy: flag fixed-length samples whose
    last 256 tokens have entropy < 4 for resampling, as the reference does."""

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
    # First-hitting draws each step's token only at the position(s) it commits, by inverse CDF
    # in float64 over those rows only, with the block's random numbers drawn up front (no host
    # sync per step): the distribution of the reference's draw (a Gumbel race over every
    # position of the block, benchmarks/baselines.py), other random numbers.
    # Parallel decoding (first-hitting): commit `tokens_per_step` masked
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
        if (parallel or self.unmask_order != "random") and not self.first_hitting:
            raise ValueError(
                "parallel decoding and sampling.unmask_order need sampling.first_hitting"
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
    nfe_denoise: Tensor  # (B,) model calls that changed the sequence (the reference's NFE;
    # with a time-conditioned DDPM, every call while the sequence had a masked position)
    nfe_total: Tensor  # (B,) denoising calls plus separate KV-cache commit passes
    stop_reason: list[str]  # "length" | "eos" | "low_entropy" | "rejected_low_entropy"
    prompt_pad: Tensor  # (B,) left padding in front of each row's prompt
