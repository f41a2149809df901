"""The autoregressive baseline's entry (algorithms/ar.py; configs/algo/ar.yaml): K = 1 on a
token-causal DiT without adaLN, next-token sampling with the KV cache."""

from __future__ import annotations

import functools

from algorithms.ar import Autoregressive
from registry.spec import AlgoSettings, BuildContext, ObjectiveSpec
from sampling.ar import ar_sample
from sampling.denoiser import ModelDenoiser


def build(settings: AlgoSettings, context: BuildContext) -> Autoregressive:
    return Autoregressive(mask_id=context.mask_id, seq_len=context.seq_len, crop=context.crop)


def sampler(objective, backbone, network, window: int, reencode: bool):
    return functools.partial(
        ar_sample, ModelDenoiser(backbone, objective, window, reencode, network)
    )


ENTRY = ObjectiveSpec(
    name="ar",
    parameterization="ar",
    label="an AR (causal, no adaLN) model",
    settings=AlgoSettings,
    build=build,
    block_size=lambda settings, context: 1,
    fixed_k_reason="predicts one token at a time",
    backbones=("dit", "hf_causal"),
    causal=True,
    sampler=sampler,
)
