"""The objective contract (`Objective`, `Capabilities`) and the pieces the objectives share:
the forward process (per-block antithetic t, masking, clipped-interval resampling), the SUBS
parameterisation and the loss reduction (paper Secs. 3-4).

Pure torch: no Lightning, no Hydra, no nn.Module state. Random draws use torch's global RNG
unless a `generator` is given.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = -1_000_000.0  # the reference's "minus infinity" for logits (paper Sec. 4.1)
DEFAULT_EPS_MIN = 1e-3  # training.sampling_eps: the unbiased NELBO interval is [1e-3, 1]
DEFAULT_EPS_MAX = 1.0
MAX_RESAMPLE_ROUNDS = 10_000


# sample_eval's sampler options (`sampling.*` keys, configs/config.yaml's order): SamplerConfig's
# fields that shape the draws, and the uncached variant (KV cache, prompts: Capabilities).
SAMPLER_OPTIONS = (
    "var_length", "reject_low_entropy", "nucleus_p", "first_hitting", "reencode_context",
    "fuse_commit", "tokens_per_step", "confidence_threshold", "entropy_bound", "eb_gamma",
    "unmask_order",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SamplingKeys:
    """What an objective declares of its sampler (Capabilities.sampling_keys):
    `reads`, the SAMPLER_OPTIONS it reads; settings refuse the others when set away from their
    defaults. `instead`: (option, the key that does its job here) pairs, named in that
    refusal."""

    reads: frozenset[str]
    instead: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        unknown = set(self.reads) - set(SAMPLER_OPTIONS)
        if unknown:
            raise ValueError(f"not sampler options: {sorted(unknown)}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the network sees an input sequence of length S.

    mask: attention predicate over the S positions (models.attention), None = full attention.
    halves: 2 when the input is [x_t ; x_0]; both halves then share rotary positions 0..S/2-1.
    outputs: the positions whose logits are needed: None (all), a slice, or a boolean (B, S)
    tensor (the network then returns (N, V) logits for the N selected positions).
    """

    mask: Any = None
    halves: int = 1
    outputs: slice | Tensor | None = None


# network(tokens (B, S), sigma (B,) or None, layout) -> logits (B, S', V)
Network = Callable[[Tensor, Tensor | None, Layout], Tensor]


@dataclasses.dataclass
class Loss:
    """loss: scalar NELBO per token; nlls: (B, L) per-token terms already multiplied by
    token_mask; token_mask: (B, L) float weights that form the denominator."""

    loss: Tensor
    nlls: Tensor
    token_mask: Tensor


def f32_equal(a: float | Tensor, b: float) -> bool:
    """Equality as the reference tests it: in float32 (float32(1e-3) == 1e-3 there)."""
    return bool(np.float32(float(a)) == np.float32(b))


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's rows of a global batch: `rows` (B,) are their indices among the `size`
    rows of the global batch. Noise is drawn for the whole global batch and indexed, so N
    processes draw exactly the noise of one process holding the global batch.

    Training: `Shard.interleaved` (rows rank, rank + world, ..., the distributed samplers'
    interleaving). Evaluation: the rows the evaluation loader reports (`Shard.from_batch`), where
    `size` counts the real rows of the global batch and padding rows (index >= size, repeats
    that make the ranks' batches equal) are dropped by the caller.
    """

    rows: Tensor
    size: int

    @classmethod
    def interleaved(cls, batch_size: int, rank: int, world: int, device) -> Shard:
        rows = torch.arange(batch_size, device=device) * world + rank
        return cls(rows, batch_size * world)

    @classmethod
    def from_batch(cls, batch: dict) -> Shard | None:
        """The shard an evaluation batch describes (data.loaders.EvalRows), or None."""
        if "global_row" not in batch:
            return None
        return cls(batch["global_row"], int(batch["global_batch_rows"][0]))


def draw_uniform(
    shape: tuple[int, ...], device, generator: torch.Generator | None, shard: Shard | None
) -> Tensor:
    """U[0, 1) of `shape` (rows first), drawn for the global batch when sharded."""
    if shard is None:
        return torch.rand(shape, device=device, generator=generator)
    full = torch.rand((shard.size, *shape[1:]), device=device, generator=generator)
    return full[shard.rows.clamp(max=shard.size - 1)]  # padding rows (>= size) are dropped


def sample_t(
    batch_size: int,
    seq_len: int,
    block_size: int,
    eps_min: Tensor,
    eps_max: Tensor,
    antithetic: bool,
    device: torch.device,
    generator: torch.Generator | None = None,
    shard: Shard | None = None,
) -> Tensor:
    """Diffusion times, one per (sequence, block) (paper Algorithm 1).

    Returns (B, L) with each block's value repeated K times, or (B, 1) when K == L.
    Antithetic strata are assigned batch-major over the (global) batch of N = rows x nb draws:
    u[b, j] <- (u[b, j] + b*nb + j) / N mod 1, b the global row index.
    If eps_min >= 1 and eps_max >= 1 ("NLL mode") every t is 1.
    """
    num_blocks = seq_len // block_size
    u = draw_uniform((batch_size, num_blocks), device, generator, shard)
    if antithetic:
        if shard is None:
            rows, size = torch.arange(batch_size, device=device), batch_size
        else:
            rows, size = shard.rows, shard.size  # global row indices
        n = size * num_blocks
        offset = (rows[:, None] * num_blocks + torch.arange(num_blocks, device=device)) / n
        u = (u / n + offset) % 1
    if block_size != seq_len:
        u = u.repeat_interleave(block_size, dim=-1)
    if eps_min >= 1 and eps_max >= 1:
        return torch.ones_like(u)
    return u * (eps_max - eps_min) + eps_min


def check_resample_interval(eps_min: float, eps_max: float, block_size: int) -> None:
    """Resampling redraws blocks until their masked fraction is in range; it can only end if
    some fraction j/K lies inside the interval (the reference loops forever otherwise)."""
    fractions = np.arange(block_size + 1, dtype=np.float32) / np.float32(block_size)
    lo, hi = np.float32(eps_min), np.float32(eps_max)
    if not ((fractions >= lo) & (fractions <= hi)).any():
        raise ValueError(
            f"training.resample: no masked fraction j/{block_size} lies in the clip interval "
            f"[{eps_min}, {eps_max}]; widen the interval or set training.resample=False"
        )


def q_xt(
    x0: Tensor,
    move_chance: Tensor,
    mask_id: int,
    block_size: int,
    eps_min: Tensor,
    eps_max: Tensor,
    resample: bool,
    generator: torch.Generator | None = None,
    shard: Shard | None = None,
) -> Tensor:
    """Mask each token independently with probability `move_chance` (paper Sec. 3.1).

    x0: (B, L); move_chance: (B, L) or (B, 1). With `resample` and a clipped interval, blocks
    whose masked fraction falls outside it are redrawn (strict U < p) until all are in range.
    """
    if block_size == 1 and f32_equal(eps_min, 1.0):
        return torch.full_like(x0, mask_id)
    draw = draw_uniform(tuple(x0.shape), x0.device, generator, shard)
    xt = torch.where(draw <= move_chance, mask_id, x0)
    low_default, high_default = f32_equal(eps_min, DEFAULT_EPS_MIN), f32_equal(eps_max, 1.0)
    if not resample or (low_default and high_default):
        return xt
    check_resample_interval(float(eps_min), float(eps_max), block_size)
    B, L = x0.shape
    nb = L // block_size
    xt = xt.view(B, nb, block_size)
    x0_blocks = x0.view(B, nb, block_size)
    p_blocks = move_chance.expand(B, L).reshape(B, nb, block_size)
    for _ in range(MAX_RESAMPLE_ROUNDS):
        fraction = (xt == mask_id).float().mean(-1)  # (B, nb)
        if low_default:  # only the upper bound is clipped
            bad = fraction > eps_max
        elif high_default:  # only the lower bound is clipped
            bad = fraction < eps_min
        else:
            bad = (fraction < eps_min) | (fraction > eps_max)
        if not bad.any():
            return xt.view(B, L)
        redraw = draw_uniform(tuple(xt.shape), x0.device, generator, shard) < p_blocks
        xt = torch.where(bad[..., None], torch.where(redraw, mask_id, x0_blocks), xt)
    raise RuntimeError(f"q_xt: resampling did not converge in {MAX_RESAMPLE_ROUNDS} rounds")


@dataclasses.dataclass(frozen=True)
class DoubleLengthCrop:
    """The text8-crop path: training rows of 2L tokens are cut to a random window of
    L (one start per batch), the target is the window shifted by one, and with special tokens
    the input starts with BOS and the target ends with EOS."""

    bos_id: int
    eos_id: int
    insert_special: bool

    def __call__(
        self, x: Tensor, attention_mask: Tensor, seq_len: int, generator=None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x, attention_mask: (B, 2L) -> input (B, L), target (B, L), mask (B, L)."""
        if x.shape[1] != 2 * seq_len:
            raise ValueError(f"rows of {x.shape[1]} tokens: expected {seq_len} or {2 * seq_len}")
        # drawn where the generator lives (the model's device during training)
        device = generator.device if generator is not None else x.device
        start = int(torch.randint(seq_len, (1,), generator=generator, device=device))
        inputs = x[:, start : start + seq_len].clone()
        target = x[:, start + 1 : start + seq_len + 1].clone()
        if target.shape[1] < seq_len:  # the last start has no token after the window
            target = torch.cat([target, x[:, -1:]], dim=1)
        if self.insert_special:
            inputs[:, 0] = self.bos_id
            target[:, -1] = self.eos_id
        return inputs, target, attention_mask[:, start : start + seq_len]


def sigma_from_p(p: Tensor, sigma_max: float) -> Tensor:
    """The noise level given to the network and to SEDD: min(-log(1 - p), sigma_max)."""
    return torch.clamp(-torch.log(1 - p), max=sigma_max)


def process_sigma(sigma: Tensor, time_conditioning: bool) -> Tensor:
    """(B, k) -> (B,) by averaging; zeros when time conditioning is off (adaLN stays on)."""
    sigma = sigma.mean(-1)
    return sigma if time_conditioning else torch.zeros_like(sigma)


@functools.lru_cache(maxsize=16)
def _mask_offset(vocab_size: int, mask_id: int, device: torch.device) -> Tensor:
    """(V,) zeros with NEG_INF at mask_id, made once per (V, mask_id, device); never edited."""
    offset = torch.zeros(vocab_size, device=device)
    offset[mask_id] = NEG_INF
    return offset


def subs_log_probs(logits: Tensor, xt: Tensor, mask_id: int) -> Tensor:
    """SUBS parameterisation (paper Sec. 4.1): log-probabilities (B, L, V) in float32.

    The mask logit gets -1e6 before normalising; at positions where x_t is not the mask the
    row becomes a one-hot on x_t (0 there, -1e6 elsewhere). Two passes over the vocabulary (a
    fused log-softmax) plus in-place edits; equals the reference's version
    (benchmarks/baselines.subs_log_probs_reference) to float rounding.
    """
    shifted = logits.float() + _mask_offset(logits.shape[-1], mask_id, logits.device)
    log_probs = torch.log_softmax(shifted, dim=-1)
    index = xt[..., None]
    unmasked = index != mask_id
    kept = log_probs.gather(-1, index)  # masked rows: the mask column, written back unchanged
    log_probs.masked_fill_(unmasked, NEG_INF)
    return log_probs.scatter_(-1, index, kept.masked_fill(unmasked, 0.0))


def subs_log_prob_of(logits: Tensor, x0: Tensor, mask_id: int) -> Tensor:
    """log p_theta(x0 | x_t) under SUBS at masked positions of x_t, without materialising the
    full SUBS tensor. logits: (N, V) for the N masked positions; x0: (N,) -> (N,).

    Equals subs_log_probs(...).gather(-1, x0) there to float rounding (a fused log-softmax vs
    logits - logsumexp). Unmasked positions need no logits: their SUBS value is exactly 0.
    """
    shifted = logits.float() + _mask_offset(logits.shape[-1], mask_id, logits.device)
    return -F.cross_entropy(shifted, x0, reduction="none")


def reduce_loss(nll: Tensor, attention_mask: Tensor, ignore_bos: bool, train: bool) -> Loss:
    """Paper Sec. 3.1: NELBO per token = sum(nll * mask) / sum(mask).

    The denominator counts every token, masked or not. With `ignore_bos`, position 0 leaves the
    denominator only at evaluation time (during training it stays, as in the reference).
    """
    token_mask = attention_mask.to(nll.dtype)
    if ignore_bos and not train:
        token_mask = token_mask.clone()
        token_mask[:, 0] = 0
    nlls = nll * token_mask
    return Loss(loss=nlls.sum() / token_mask.sum(), nlls=nlls, token_mask=token_mask)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What an objective supports; validation and the samplers read this, never names."""

    kv_cache: bool  # clean keys can be cached across sampling steps
    prompts: bool  # samples can continue a prompt
    ppl_eval: bool  # has a likelihood bound (eval_interval), so mode=ppl_eval applies
    clip_interval: bool  # draws t from [eps_min, eps_max] (the clip interval, var_min's search)
    two_stream: bool  # the training input is [x_t ; x_0] (BD3-LM's cross_attn)
    time_conditioned: bool  # the network reads sigma (t)
    reencodes_window: bool  # uncached sampling always re-encodes its last window (MDLM)
    sampling_keys: SamplingKeys  # the sampler options it reads


class Objective(abc.ABC):
    """What every training objective provides (algorithms/ar.py, masked_diffusion.py, sedd.py,
    ssdlm.py); the run, validation, the samplers and the evaluation harness see only this.
    Subclasses are dataclasses of plain fields (no nn.Module): the network is passed in.

    block_size: K, the tokens sharing one diffusion time (AR 1, MDLM and SEDD L). seq_len: L,
    a training row's length, and mask_id (AR, MDLM / BD3-LM, SEDD). crop: the text8-crop of
    rows of 2L tokens (`crop_rows`), None when rows have L. train_layout: how the network (a
    `Network`; not SSD-LM's, which reads (context, simplex, t)) sees a training input.
    """

    block_size: int
    seq_len: int
    mask_id: int
    crop: DoubleLengthCrop | None = None
    train_layout: Layout

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What the objective supports (a class attribute where it does not depend on fields)."""

    @abc.abstractmethod
    def sampling_blocks(self, window: int, length: int) -> tuple[int, int | None]:
        """(K, stride) of the sampler for `length` tokens on a network of `window` positions:
        K tokens drawn together; stride: the window's move per round beyond the first, None
        for one block after another."""

    @abc.abstractmethod
    def sample_mask(self, window: int, reencode: bool):
        """Uncached sampling's attention predicate (models.attention; None: full attention) over
        the sequence so far, or over its last `window` tokens re-encoded (`reencode`)."""

    @abc.abstractmethod
    def eval_interval(self) -> tuple[float, float]:
        """(eps_min, eps_max) of the bound validation and ppl_eval report (when ppl_eval)."""

    @abc.abstractmethod
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
        """One Monte-Carlo estimate on clean rows x0 (B, L) (or (B, 2L) with `crop`), weighted
        by attention_mask of x0's shape. eps_min / eps_max: float32 0-d tensors, the interval
        of t (read where capabilities.clip_interval). train: reduce_loss's flag; generator:
        the noise's RNG (None: torch's global RNG); shard: this process's rows."""

    def check_rows(self, seq_len: int) -> None:
        """ValueError unless training rows of `seq_len` tokens suit the objective (any do here)."""
        return None

    @abc.abstractmethod
    def log_probs(self, logits: Tensor, x_last: Tensor) -> Tensor:
        """The sampler's float32 log-probabilities (B, n, V) from the network's logits
        (B, n, V) at n positions whose current tokens are x_last (B, n)."""

    def crop_rows(
        self, x0: Tensor, attention_mask: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The text8-crop step: with `crop` set and rows of 2L tokens, DoubleLengthCrop's
        random window (input, target, mask), each (B, L); None when rows are used as given."""
        if self.crop is None or x0.shape[1] != 2 * self.seq_len:
            return None
        return self.crop(x0, attention_mask, self.seq_len, generator)

    # names from before Capabilities, read until their readers move to `capabilities`
    @property
    def supports_kv_cache(self) -> bool:
        return self.capabilities.kv_cache

    @property
    def supports_prompts(self) -> bool:
        return self.capabilities.prompts
