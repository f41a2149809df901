"""BD3-LM and MDLM: the masked-diffusion NELBO over blocks (paper Secs. 3.1-3.2).

BD3-LM (cross_attn) feeds [x_t ; x_0] (B, 2L) through the block-diffusion mask so that block b
of x_t sees itself and the clean blocks before it. MDLM is the same objective with K = L and
the input x_t alone under full attention; with K = L the x_0 half could never be attended
anyway, so the two agree on the same t and x_t.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from algorithms.base import (
    SAMPLER_OPTIONS,
    Capabilities,
    DoubleLengthCrop,
    Layout,
    Loss,
    Network,
    SamplingKeys,
    Shard,
    process_sigma,
    reduce_loss,
    subs_log_prob_of,
    subs_log_probs,
)
from algorithms.masking import MaskingObjective
from models.attention import BandedBlockCausalMask, BlockCausalMask, BlockDiffusionMask
from noise_schedule import NoiseSchedule


@dataclasses.dataclass
class MaskedDiffusion(MaskingObjective):
    noise: NoiseSchedule
    mask_id: int
    seq_len: int  # L
    block_size: int  # K
    cross_attn: bool  # BD3-LM's two-stream input [x_t ; x_0]
    ignore_bos: bool
    time_conditioning: bool
    antithetic: bool
    mdlm_loss_scale: bool = False
    resample: bool = False
    eval_nll: bool = True
    var_min: bool = False  # BD3-LM: learned clip interval, validation over interval keys
    crop: DoubleLengthCrop | None = None  # text8-crop: 2L training rows
    # training only: + ar_loss_weight x the next-token NLL of the clean stream (`nelbo`)
    ar_loss_weight: float = 0.0

    def __post_init__(self):
        if self.seq_len % self.block_size:
            raise ValueError(
                f"block_size={self.block_size} must divide model.length={self.seq_len}"
            )
        if self.ar_loss_weight and not self.cross_attn:
            raise ValueError(
                f"algo.ar_loss_weight={self.ar_loss_weight} reads the clean stream x_0 of the "
                "two-stream input: it needs algo=bd3lm (algo.cross_attn=true)"
            )
        self.check_noise()

    @property
    def train_layout(self) -> Layout:
        if self.cross_attn:
            mask = BlockDiffusionMask(self.seq_len, self.block_size)
            return Layout(mask=mask, halves=2, outputs=slice(0, self.seq_len))
        return Layout()

    sampler = "semi_ar"  # blocks left to right (sampling/block.py)
    # first-hitting or DDPM steps, parallel decoding, the uncached re-encoding (MDLM always
    # re-encodes its window) and the fused commit of the KV cache
    sampling_keys = SamplingKeys(frozenset(SAMPLER_OPTIONS))

    @property
    def capabilities(self) -> Capabilities:
        """KV cache: BD3-LM without time conditioning (cached keys of a clean block are what any
        later call would compute; MDLM re-encodes its window, a time-conditioned model its
        context). Prompts: BD3-LM."""
        return Capabilities(
            kv_cache=self.cross_attn and not self.time_conditioning,
            prompts=self.cross_attn,
            ppl_eval=True,
            clip_interval=True,
            two_stream=self.cross_attn,
            time_conditioned=self.time_conditioning,
            reencodes_window=not self.cross_attn,
            sampling_keys=self.sampling_keys,
        )

    def sampling_blocks(self, window: int, length: int) -> tuple[int, int | None]:
        """(K, stride) of the sampler. BD3-LM: its blocks. MDLM: one block of its window, then
        (beyond it) rounds of window / 2 new tokens (the reference's semi-AR MDLM)."""
        if self.cross_attn:
            return self.block_size, None
        block = min(self.block_size, window)
        return block, (window // 2 if length > block else None)

    def sample_mask(self, window: int, reencode: bool):
        """Attention over [clean blocks ; noisy block] when sampling without a cache.

        BD3-LM: block-causal (M_BC). Over a whole sequence longer than the window, banded to
        `window` tokens: exactly what the KV cache computes. reencode: the reference's variant,
        where the caller feeds only the last `window` tokens, re-encoded from position 0.
        MDLM: full attention over the window (always re-encoded)."""
        if not self.cross_attn:
            return None
        if reencode:
            return BlockCausalMask(self.block_size)
        return BandedBlockCausalMask(self.block_size, window // self.block_size)

    def eval_interval(self) -> tuple[float, float]:
        """The (eps_min, eps_max) whose loss validation reports (paper Sec. 5.2): the exact NLL
        (t = 1) for block size 1 with eval_nll, else the unbiased [1e-3, 1] NELBO."""
        if self.block_size == 1 and (self.eval_nll or not self.var_min):
            return 1.0, 1.0
        return 1e-3, 1.0

    def corrupt(
        self,
        x0: Tensor,
        eps_min: Tensor,
        eps_max: Tensor,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw t per block and x_t ~ q(x_t | x_0) (paper Algorithm 1; `forward_process`).

        x0: (B, L); eps_min/eps_max: float32 0-d tensors (the clip interval).
        Returns x_t (B, L), loss_scale (B, L) or (B, 1) (= -1/t) and sigma (B, k).
        """
        xt, t, loss_scale, sigma = self.forward_process(x0, eps_min, eps_max, generator, shard)
        if self.mdlm_loss_scale:
            loss_scale = -self.noise.rate_noise(t) / torch.expm1(sigma)
        if eps_min > 0.5:  # NLL mode (K = 1, t = 1): weight -1 (fires for any eps_min > 0.5)
            loss_scale = -torch.ones_like(loss_scale)
        return xt, loss_scale, sigma

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
        """The reduced NELBO for given x_t (paper Algorithm 1, Sec. 3.1).

        Only masked positions of x_t go through the output layer: elsewhere SUBS gives
        log p = 0, so their terms are exactly 0 (as in the reference) at no cost (the
        reference's dense version: benchmarks/baselines.DenseNELBO).

        With ar_loss_weight (training only) the same call also reads the clean stream's rows
        0..L-2, row L + i being the network's next-token logits for x_0[i + 1] (a backbone
        whose clean stream is token-causal: models/hf_causal), and `loss` gains
        ar_loss_weight x their mean next-token NLL (mask column excluded, weighted by
        attention_mask[:, 1:]); `nlls` and `token_mask` stay the NELBO's.
        """
        masked = xt == self.mask_id  # (B, L)
        tokens = torch.cat([xt, x0], dim=1) if self.cross_attn else xt
        sigma = process_sigma(sigma, self.time_conditioning)
        # a (B, L) selection over (B, 2L) tokens: logits only for x_t positions, which also
        # tells the network that its last block can skip the x_0 queries
        clean_rows = None
        if train and self.ar_loss_weight:
            clean_rows = torch.zeros_like(masked)
            clean_rows[:, :-1] = True
        selection = masked if clean_rows is None else torch.cat([masked, clean_rows], dim=1)
        layout = dataclasses.replace(self.train_layout, outputs=selection)
        logits = network(tokens, sigma, layout)  # (N, V), rows of `selection` row-major
        ar_logits = None
        if clean_rows is not None:
            in_xt = torch.zeros_like(selection)
            in_xt[:, : self.seq_len] = True
            in_xt = in_xt[selection]
            logits, ar_logits = logits[in_xt], logits[~in_xt]
        log_p = subs_log_prob_of(logits, x0[masked], self.mask_id)
        weight = loss_scale.expand_as(xt)[masked]
        nll = torch.zeros(xt.shape, dtype=log_p.dtype, device=xt.device)
        nll = nll.masked_scatter(masked, weight * log_p)
        loss = reduce_loss(nll, attention_mask, self.ignore_bos, train)
        if ar_logits is not None:
            next_nll = -subs_log_prob_of(ar_logits, x0[:, 1:].flatten(), self.mask_id)
            ar_weight = attention_mask[:, 1:].flatten().to(next_nll.dtype)
            ar_mean = (next_nll * ar_weight).sum() / ar_weight.sum()
            loss.loss = loss.loss + self.ar_loss_weight * ar_mean
        return loss

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
        """One Monte-Carlo NELBO estimate. x0, attention_mask: (B, L) (or (B, 2L) with crop)."""
        window = self.crop_rows(x0, attention_mask, generator)
        if window is not None:
            x0, _, attention_mask = window
        xt, loss_scale, sigma = self.corrupt(x0, eps_min, eps_max, generator, shard)
        return self.nelbo(network, x0, xt, loss_scale, sigma, attention_mask, train)

    def log_probs(self, logits: Tensor, x_last: Tensor) -> Tensor:
        """SUBS (subs_log_probs): unmasked positions of x_last keep their token."""
        return subs_log_probs(logits, x_last, self.mask_id)
