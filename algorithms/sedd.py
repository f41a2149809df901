"""SEDD: score-entropy discrete diffusion with the absorbing (masking) process.

The network's logits become log concrete scores log s(x_t)_v ~ log p_t(v) / p_t(x_t) (the
log-score parameterisation), trained with the score-entropy loss at masked positions, weighted
by dsigma. It shares the forward process of MDLM: one t per sequence (K = L), antithetic
strata, masking with probability t, position 0 kept with `ignore_bos`. Unlike MDLM the network
is time-conditioned on sigma = min(-log(1 - t), sigma_max). Sampling is the analytic
(Tweedie tau-leaping) sampler of `sampling/analytic.py`, which calls `SEDD.score_fn`.

Pure torch, float32 throughout, like the other objectives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

from algorithms.base import (
    DEFAULT_EPS_MAX,
    DEFAULT_EPS_MIN,
    Capabilities,
    DoubleLengthCrop,
    Layout,
    Loss,
    Network,
    SamplingKeys,
    Shard,
    process_sigma,
    reduce_loss,
)
from algorithms.masking import MaskingObjective
from noise_schedule import NoiseSchedule

EXPM1_BELOW = 0.5  # e^sigma - 1 is computed with expm1 below this sigma, as exp - 1 above

# x (B, L) tokens, sigma (B,) processed noise level -> log score (B, L, V), float32
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def log_expm1(sigma: Tensor) -> Tensor:
    """log(e^sigma - 1), with expm1 for sigma < 0.5 and exp - 1 otherwise (the reference's
    branch: the two differ in the last float32 bits for large sigma)."""
    return torch.where(sigma < EXPM1_BELOW, torch.expm1(sigma), sigma.exp() - 1).log()


def sedd_log_score(logits: Tensor, xt: Tensor, sigma: Tensor) -> Tensor:
    """The log-score parameterisation: log s = logits - log(e^sigma - 1) - log(V - 1),
    then 0 at the current token x_t.

    logits: (..., V) raw network outputs; xt: (...) the tokens the network saw at those
    positions; sigma: the processed noise level, broadcastable to xt's shape (e.g. (B, 1) for
    (B, L) or (N,) for N selected rows). V is the full output width, mask included.
    Returns float32 (..., V).
    """
    vocab_size = logits.shape[-1]
    shift = log_expm1(sigma.float()).expand(xt.shape)
    log_score = logits.float() - shift[..., None] - math.log(vocab_size - 1)
    return log_score.scatter(-1, xt[..., None], 0.0)


def score_entropy(log_score: Tensor, x0: Tensor, sigma: Tensor, mask_id: int) -> Tensor:
    """Score entropy at masked positions, rows (N,).

    log_score: (N, V) log scores at N positions where x_t is the mask (so the mask column is 0);
    x0: (N,) the clean tokens there; sigma: (N,) the unprocessed sigma of each row's sequence.
    With r = 1/(e^sigma - 1) (expm1):
      entropy = sum_{v != m} exp(log s_v) - r log s_{x0} + r (log r - 1)  >= 0,
    zero exactly when s_v = r 1[v = x0] (the true ratios given x0).
    """
    score = log_score.exp()
    positive = score[:, :mask_id].sum(-1) + score[:, mask_id + 1 :].sum(-1)
    ratio = 1 / torch.expm1(sigma)
    negative = ratio * log_score.gather(-1, x0[:, None]).squeeze(-1)
    constant = ratio * (ratio.log() - 1)
    return positive - negative + constant


def dsigma_of(loss_scale: Tensor, sigma: Tensor) -> Tensor:
    """SEDD's weight (B, 1) = -loss_scale * expm1(sigma) (= expm1(sigma) / t for log-linear)
    from the schedule's loss_scale (B, L) or (B, 1), read at each row's first t, and sigma
    (B, 1)."""
    return -loss_scale[:, 0:1] * torch.expm1(sigma)


@dataclasses.dataclass
class SEDD(MaskingObjective):
    """The SEDD objective. block_size is always seq_len (one t per sequence)."""

    noise: NoiseSchedule
    mask_id: int
    seq_len: int  # L
    ignore_bos: bool = True
    time_conditioning: bool = True
    antithetic: bool = True
    mdlm_loss_scale: bool = False
    resample: bool = False
    crop: DoubleLengthCrop | None = None  # text8-crop: 2L training rows

    cross_attn = False  # not a field: the input is x_t alone under full attention
    var_min = False
    train_layout = Layout()
    sampler = "analytic"  # every position at once, T steps (sampling/analytic.py)
    # T tau-leaping steps over the whole sequence, through the score alone (no denoiser)
    capabilities = Capabilities(
        kv_cache=False,
        prompts=False,
        ppl_eval=True,
        clip_interval=True,
        two_stream=False,
        time_conditioned=True,
        reencodes_window=True,  # no denoiser: unused
        sampling_keys=SamplingKeys(frozenset({"var_length", "reject_low_entropy", "nucleus_p"})),
    )
    sampling_keys = capabilities.sampling_keys

    def sampling_blocks(self, window: int, length: int) -> tuple[int, int | None]:
        """(K, stride) of the sampler: no blocks; SEDD never goes beyond its context."""
        if length > window:
            raise ValueError(
                f"SEDD cannot sample beyond its context: model.length={length} > {window}"
            )
        return 1, None

    def __post_init__(self):
        if not self.time_conditioning:
            raise ValueError(
                "algo.time_conditioning=false: SEDD's log score divides by e^sigma - 1 of the "
                "processed sigma, which time conditioning off would zero; use true"
            )
        self.check_noise()

    @property
    def block_size(self) -> int:
        return self.seq_len

    def sample_mask(self, window: int, reencode: bool):
        """Full attention over the (at most L-token) sequence: SEDD never goes beyond L."""
        return None

    def eval_interval(self) -> tuple[float, float]:
        """The unbiased [1e-3, 1] bound (K = L > 1; SEDD has no exact-NLL mode)."""
        return DEFAULT_EPS_MIN, DEFAULT_EPS_MAX

    def corrupt(
        self,
        x0: Tensor,
        eps_min: Tensor,
        eps_max: Tensor,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """t per sequence, x_t ~ q(x_t | x_0). Returns x_t (B, L), dsigma (B, 1), sigma (B, 1).

        dsigma = -loss_scale * expm1(sigma) = expm1(sigma) / t with the clipped sigma of the
        mask probability; with mdlm_loss_scale sigma = total_noise(t), dsigma = rate_noise(t)
        and the mask probability is 1 - e^-sigma. The NLL-mode weight override of the SUBS
        loss (eps_min > 0.5) touches only loss_scale, so it never reaches dsigma.
        """
        xt, t, loss_scale, sigma = self.forward_process(x0, eps_min, eps_max, generator, shard)
        mdlm = self.mdlm_loss_scale
        dsigma = self.noise.rate_noise(t) if mdlm else dsigma_of(loss_scale, sigma)
        return xt, dsigma, sigma

    def nelbo(
        self,
        network: Network,
        x0: Tensor,
        xt: Tensor,
        loss_scale: Tensor,
        sigma: Tensor,
        attention_mask: Tensor,
        train: bool,
    ) -> Loss:
        """score_entropy_loss with dsigma from the schedule's loss_scale (`dsigma_of`)."""
        dsigma = dsigma_of(loss_scale, sigma)
        return self.score_entropy_loss(network, x0, xt, dsigma, sigma, attention_mask, train)

    def score_entropy_loss(
        self,
        network: Network,
        x0: Tensor,
        xt: Tensor,
        dsigma: Tensor,
        sigma: Tensor,
        attention_mask: Tensor,
        train: bool,
    ) -> Loss:
        """dsigma * score entropy at masked positions, 0 elsewhere, reduced as the NELBO.

        Only masked positions go through the output layer (elsewhere the term is exactly 0).
        The log score uses the processed sigma (B,), the entropy's r the unprocessed (B, 1)
        sigma (equal values here since there is one sigma per sequence)."""
        masked = xt == self.mask_id  # (B, L)
        processed = process_sigma(sigma, self.time_conditioning)  # (B,)
        layout = dataclasses.replace(self.train_layout, outputs=masked)
        logits = network(xt, processed, layout)  # (N, V)
        rows = processed[:, None].expand_as(xt)[masked]
        log_score = sedd_log_score(logits, xt[masked], rows)
        entropy = score_entropy(log_score, x0[masked], sigma.expand_as(xt)[masked], self.mask_id)
        weight = dsigma.expand_as(xt)[masked]
        nll = torch.zeros(xt.shape, dtype=entropy.dtype, device=xt.device)
        nll = nll.masked_scatter(masked, weight * entropy)
        return reduce_loss(nll, attention_mask, self.ignore_bos, train)

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
        """One Monte-Carlo estimate of the score-entropy bound per token. x0, attention_mask:
        (B, L) (or (B, 2L) with crop)."""
        window = self.crop_rows(x0, attention_mask, generator)
        if window is not None:
            x0, _, attention_mask = window
        xt, dsigma, sigma = self.corrupt(x0, eps_min, eps_max, generator, shard)
        return self.score_entropy_loss(network, x0, xt, dsigma, sigma, attention_mask, train)

    def log_probs(self, logits: Tensor, x_last: Tensor) -> Tensor:
        """SEDD's network gives scores, not probabilities (see score_fn)."""
        raise NotImplementedError(
            "SEDD has no denoiser log-probabilities: its analytic sampler reads score_fn"
        )

    def score_fn(self, network: Network) -> ScoreFn:
        """The analytic sampler's view of the network: (x (B, S), sigma (B,)) -> log score
        (B, S, V), full attention, S <= L."""

        def log_score(x: Tensor, sigma: Tensor) -> Tensor:
            if x.shape[1] > self.seq_len:
                raise ValueError(f"SEDD sees at most model.length={self.seq_len} tokens")
            logits = network(x, sigma, Layout())
            return sedd_log_score(logits, x, sigma[:, None])

        return log_score
