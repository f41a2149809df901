"""SEDD's entry (algorithms/sedd.py; configs/algo/sedd.yaml): K = L, time-conditioned,
sampled by the analytic (Tweedie tau-leaping) sampler through the score alone."""

from __future__ import annotations

import functools

from algorithms.sedd import SEDD
from models.network import BackboneNetwork
from registry.spec import AlgoSettings, BuildContext, ObjectiveSpec
from sampling.analytic import analytic_sample


def build(settings: AlgoSettings, context: BuildContext) -> SEDD:
    return SEDD(
        noise=context.noise,
        mask_id=context.mask_id,
        seq_len=context.seq_len,
        ignore_bos=settings.ignore_bos,
        time_conditioning=settings.time_conditioning,
        antithetic=context.antithetic,
        mdlm_loss_scale=settings.mdlm_loss_scale,
        resample=context.resample,
        crop=context.crop,
    )


def sampler(objective, backbone, network, window: int, reencode: bool):
    score_fn = objective.score_fn(network or BackboneNetwork(backbone))
    return functools.partial(analytic_sample, score_fn, noise=objective.noise)


ENTRY = ObjectiveSpec(
    name="sedd",
    parameterization="sedd",
    label="a SEDD model",
    settings=AlgoSettings,
    build=build,
    block_size=lambda settings, context: context,
    fixed_k_reason="diffuses its whole context at once",
    backbones=("dit",),
    sampler=sampler,
)
