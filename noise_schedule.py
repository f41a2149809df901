"""Noise schedules of the absorbing (masking) forward process behind one interface.

Each schedule maps diffusion time t in [0, 1] to
  move_chance(t)  = 1 - alpha_t, the probability that a token is masked at time t;
  loss_scale(t)  = alpha'_t / (1 - alpha_t), the continuous-time NELBO weight (negative);
and, for the log-linear schedule used by every config, the "sigma" the network is conditioned on:
  total_noise(t)  = -log(1 - (1 - eps) t),  rate_noise(t) = (1 - eps) / (1 - (1 - eps) t).
`forward(t)` returns (loss_scale, move_chance), the pair the objectives consume.
Pure torch and stateless: every tensor follows the device and dtype of `t`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class NoiseSchedule:
    name: str

    def move_chance(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_scale(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.loss_scale(t), self.move_chance(t)

    __call__ = forward


class LogLinear(NoiseSchedule):
    """alpha_t = 1 - t: the masking probability is exactly t and the weight is -1/t."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps
        self.sigma_max = -math.log(eps)  # sigma(1) ~= 6.9078

    def move_chance(self, t: Tensor) -> Tensor:
        return t

    def loss_scale(self, t: Tensor) -> Tensor:
        return -1 / t

    def total_noise(self, t: Tensor) -> Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate_noise(self, t: Tensor) -> Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


class Power(NoiseSchedule):
    """move = clamp(t^e, min 1e-3); weight = -e t^(e-1) / move (square: e=2, square root: 1/2)."""

    def __init__(self, exponent: float, name: str, eps: float = 1e-3):
        self.exponent, self.name, self.eps = exponent, name, eps

    def move_chance(self, t: Tensor) -> Tensor:
        return torch.clamp(t**self.exponent, min=self.eps)

    def loss_scale(self, t: Tensor) -> Tensor:
        return -self.exponent * t ** (self.exponent - 1) / self.move_chance(t)


class Logarithmic(NoiseSchedule):
    """move = log(1 + t) / ln 2; weight = -1 / (move ln 2 (1 + t))."""

    name = "log"

    def move_chance(self, t: Tensor) -> Tensor:
        return torch.log1p(t) / math.log(2)

    def loss_scale(self, t: Tensor) -> Tensor:
        return -1 / (self.move_chance(t) * math.log(2) * (1 + t))


class Cosine(NoiseSchedule):
    """move = 1 - (1-eps) cos(pi t / 2); weight = -(1-eps) sin(pi t/2) / (move + eps) * pi/2."""

    name = "cosine"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def move_chance(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * torch.cos(math.pi * t / 2)

    def loss_scale(self, t: Tensor) -> Tensor:
        move = self.move_chance(t)
        return -(1 - self.eps) * torch.sin(math.pi * t / 2) / (move + self.eps) * math.pi / 2


SCHEDULES = {
    "loglinear": LogLinear,
    "square": lambda: Power(2.0, "square"),
    "square_root": lambda: Power(0.5, "square_root"),
    "log": Logarithmic,
    "cosine": Cosine,
}


def build_noise(noise_type: str) -> NoiseSchedule:
    """Registry lookup; `noise.type` names the schedule."""
    if noise_type not in SCHEDULES:
        raise ValueError(f"noise.type={noise_type!r}: valid are {sorted(SCHEDULES)}")
    return SCHEDULES[noise_type]()
