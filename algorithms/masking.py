"""The masking (absorbing-state) forward process that MDLM / BD3-LM and SEDD share (paper
Algorithm 1): t per block, the noise schedule's mask probability, sigma, x_t ~ q(x_t | x_0),
position 0 kept with ignore_bos. Each objective then forms its own weights from it."""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from algorithms.base import Loss, Network, Objective, Shard, q_xt, sample_t, sigma_from_p
from noise_schedule import LogLinear, NoiseSchedule


class MaskingObjective(Objective):
    """Base of the masking objectives (MaskedDiffusion, SEDD), dataclasses with these fields:
    noise, mask_id, seq_len, block_size (K; SEDD: L), antithetic (strata of t), resample (clip
    interval kept by redrawing blocks), ignore_bos, mdlm_loss_scale (MDLM's continuous-time
    schedule: sigma = total_noise(t), mask probability 1 - e^-sigma)."""

    noise: NoiseSchedule
    antithetic: bool
    resample: bool
    ignore_bos: bool
    mdlm_loss_scale: bool

    def check_noise(self) -> None:
        """ValueError unless the schedule supports mdlm_loss_scale (its total and rate noise)."""
        if self.mdlm_loss_scale and not isinstance(self.noise, LogLinear):
            raise ValueError("algo.mdlm_loss_scale needs noise.type=loglinear")

    @property
    def noise_sigma_max(self) -> float:
        """The largest sigma given to the network: the schedule's sigma(1), else unbounded."""
        return getattr(self.noise, "sigma_max", float("inf"))

    def forward_process(
        self,
        x0: Tensor,
        eps_min: Tensor,
        eps_max: Tensor,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Draw t per block and x_t ~ q(x_t | x_0).

        x0: (B, L); eps_min/eps_max: float32 0-d tensors (the clip interval).
        Returns x_t (B, L), t and the schedule's loss_scale (B, L), or (B, 1) when K = L, and
        sigma: min(-log(1 - p), sigma_max) of the first block's mask probability p (B, 1), or
        total_noise(t) with mdlm_loss_scale (whose p is then 1 - e^-sigma).
        """
        if x0.shape[1] != self.seq_len:
            raise ValueError(f"batch length {x0.shape[1]} != model.length={self.seq_len}")
        t = sample_t(
            x0.shape[0],
            self.seq_len,
            self.block_size,
            eps_min,
            eps_max,
            self.antithetic,
            x0.device,
            generator,
            shard,
        )
        loss_scale, move_chance = self.noise(t)
        sigma = sigma_from_p(move_chance[:, 0:1], self.noise_sigma_max)  # first block's t
        if self.mdlm_loss_scale:
            sigma = self.noise.total_noise(t)
            move_chance = 1 - torch.exp(-sigma)
        xt = q_xt(
            x0,
            move_chance,
            self.mask_id,
            self.block_size,
            eps_min,
            eps_max,
            self.resample,
            generator,
            shard,
        )
        if self.ignore_bos:
            xt[:, 0] = x0[:, 0]
        return xt, t, loss_scale, sigma

    @abc.abstractmethod
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
        """The reduced loss of a drawn x_t (B, L) given the schedule's loss_scale (B, L) or
        (B, 1) and sigma (B, 1) of its time (`forward_process`)."""

    def nelbo_at(
        self, network: Network, x0: Tensor, xt: Tensor, t: Tensor, attention_mask: Tensor
    ) -> Loss:
        """The evaluation reduction of `nelbo` for x_t (B, L) that the caller drew at times
        t (B, L) (evaluation.estimators: the continuation's conditional NELBO); the schedule's
        own weights (no mdlm_loss_scale, no NLL-mode override), sigma from each row's first t."""
        loss_scale, move_chance = self.noise(t)
        sigma = sigma_from_p(move_chance[:, 0:1], self.noise_sigma_max)
        return self.nelbo(network, x0, xt, loss_scale, sigma, attention_mask, False)
