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

The objective's registry entry picks its sampler (registry.build_sampler), the objective gives
the block structure (`objective.sampling_blocks`); everything here takes plain arguments, no
config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sampling.analytic import analytic_sample
from sampling.ar import ar_sample
from sampling.block import semi_ar_sample
from sampling.config import SampleOutput, SamplerConfig
from sampling.denoiser import Denoiser, ModelDenoiser

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


__all__ = [
    "Denoiser",
    "ModelDenoiser",
    "SampleFn",
    "SampleOutput",
    "SamplerConfig",
    "TokenIds",
    "analytic_sample",
    "ar_sample",
    "sampler_config",
    "semi_ar_sample",
]
