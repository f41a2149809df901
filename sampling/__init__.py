"""Sampling: the reverse processes of every objective, behind one `build_sampler`.

  config.py         SamplerConfig (what a sampler reads) and SampleOutput
  draws.py          uniforms, the categorical (exponential race), inverse-CDF, nucleus
  denoiser.py       Denoiser (the protocol the samplers call) and ModelDenoiser (a DiT and an
                    objective behind it: masks, positions, KV cache, SUBS / next-token)
  context.py        the starting context: the prompt layout (left-padded prompts, shared with
                    hf's generate()) and its commit to the cache
  block.py          the semi-autoregressive block sampler (BD3-LM, MDLM): DDPM caching update
  first_hitting.py  first-hitting per block, and the parallel-decoding rules
  ar.py             next-token sampling (AR)
  analytic.py       SEDD's analytic (Tweedie tau-leaping) sampler
  ssdlm.py          SSD-LM's semi-autoregressive simplex sampler (its own network)
  stops.py          the per-sequence stop rules
  generate.py       the sample_eval loop: batches, the low-entropy retry rule (shared with hf's
                    generate()), records, summaries

The objective decides the sampler kind (`objective.sampler`) and the block structure
(`objective.sampling_blocks`); everything below takes plain arguments, no config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from sampling.analytic import analytic_sample
from sampling.ar import ar_sample
from sampling.block import semi_ar_sample
from sampling.config import SampleOutput, SamplerConfig
from sampling.denoiser import Denoiser, ModelDenoiser
from sampling.ssdlm import SSDLMSamplerOptions, ssdlm_sample

# sample_fn(batch_size, cfg, generator, device, prompt, prompt_valid, progress) -> SampleOutput
SampleFn = Callable[..., SampleOutput]


@dataclasses.dataclass(frozen=True)
class TokenIds:
    bos: int
    mask: int
    eos: int


def sampler_config(
    objective: Any, window: int, length: int, ids: TokenIds | None, options: dict
) -> SamplerConfig:
    """The SamplerConfig of `objective` for `length` tokens with a model trained on `window`:
    the objective gives the block structure (K and the stride), `options` the rest
    (num_steps, nucleus_p, kv_cache, ...). Raises ValueError on settings it cannot honour."""
    block, stride = objective.sampling_blocks(window, length)
    ids = ids or TokenIds(0, 0, 0)
    return SamplerConfig(
        length=length, block_size=block, context=window, bos_id=ids.bos, mask_id=ids.mask,
        eos_id=ids.eos, stride=stride, **options,
    )  # fmt: skip


def build_sampler(
    objective: Any,
    backbone,
    window: int,
    length: int,
    ids: TokenIds,
    options: dict,
    reencode: bool = False,
    network=None,
) -> tuple[SamplerConfig, SampleFn]:
    """The sampler of `objective` (its `sampler` kind) and its config (`sampler_config`).

    network: the callable network of the objectives (models.network.BackboneNetwork), made
    here when None; for SSD-LM (sampler "ssdlm") the models.ssdlm.SSDLMNetwork (`backbone`
    when None), sampled with the objective's top_p, simplex value and context (its
    sampling_blocks give stride K, so the trained window does not constrain the tiling).
    Raises ValueError on settings the sampler cannot honour.
    """
    from models.network import BackboneNetwork

    cfg = sampler_config(objective, window, length, ids, options)
    if objective.sampler == "ssdlm":  # the network is SSD-LM's own (models.ssdlm)
        ssdlm_options = SSDLMSamplerOptions(
            simplex_value=objective.simplex_value,
            top_p=objective.top_p,
            context=objective.sample_context,
            max_context=objective.max_context,
        )
        return cfg, functools.partial(ssdlm_sample, network or backbone, options=ssdlm_options)
    network = network or BackboneNetwork(backbone)
    if objective.sampler == "analytic":
        score_fn = objective.score_fn(network)
        return cfg, functools.partial(analytic_sample, score_fn, noise=objective.noise)
    denoiser = ModelDenoiser(backbone, objective, window, reencode, network)
    sampler = ar_sample if objective.sampler == "ar" else semi_ar_sample
    return cfg, functools.partial(sampler, denoiser)


__all__ = [
    "Denoiser",
    "ModelDenoiser",
    "SampleFn",
    "SampleOutput",
    "SamplerConfig",
    "TokenIds",
    "analytic_sample",
    "ar_sample",
    "build_sampler",
    "sampler_config",
    "semi_ar_sample",
    "ssdlm_sample",
]
