"""Ancestral next-token sampling of the AR baseline, with its KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from sampling.config import SampleOutput, SamplerConfig
from sampling.context import extend_valid, prefill, start_context
from sampling.denoiser import Denoiser
from sampling.draws import nucleus, sample_inverse_cdf, uniforms
from sampling.stops import SequenceState, apply_stop_rules


def draw_token(probs: Tensor, generator: torch.Generator) -> Tensor:
    """(B, V) probabilities -> (B,) tokens by inverse CDF, one uniform per sequence (the
    reference's Gumbel-max over V: benchmarks/baselines.py)."""
    return sample_inverse_cdf(probs, uniforms((probs.shape[0],), generator, probs.device))


@torch.no_grad()
def ar_sample(
    model: Denoiser,
    batch_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: torch.device,
    prompt: Tensor | None = None,
    prompt_valid: Tensor | None = None,
    progress=None,
) -> SampleOutput:
    """Ancestral next-token sampling (nucleus, then draw_token). With a cache,
    each step feeds only the newest token (and commits it); without, the network re-reads the
    sequence under the same sliding-window causal mask. NFE = tokens generated."""
    x, key_valid, pad = start_context(batch_size, prompt, prompt_valid, device)
    if x.shape[1] == 0:
        x = torch.full((batch_size, 1), cfg.bos_id, dtype=torch.long, device=device)
    gen_start = x.shape[1] if prompt is not None else 0
    total = gen_start + cfg.length
    cache = model.new_cache(batch_size, 1) if cfg.kv_cache else None
    nfe = torch.zeros(batch_size, dtype=torch.long, device=device)
    if cache is not None and x.shape[1] > 1:
        prefill(model, x[:, :-1], None if key_valid is None else key_valid[:, :-1], cache, 1)
    state = SequenceState(
        torch.ones(batch_size, dtype=torch.bool, device=device),
        torch.full((batch_size,), total, dtype=torch.long, device=device),
        ["length"] * batch_size,
    )
    zero_t = torch.zeros(batch_size, dtype=torch.float64, device=device)
    while x.shape[1] < total:
        log_p = model.logprobs(x, zero_t, 1, key_valid, cache, commit=cache is not None)
        probs = nucleus(log_p[:, -1].double().exp(), cfg.nucleus_p)
        token = draw_token(probs, generator)
        nfe += state.active
        x = torch.cat([x, token[:, None]], dim=1)
        key_valid = extend_valid(key_valid, 1)
        apply_stop_rules(x, gen_start, x.shape[1] - 1, state, cfg)
        if progress is not None:
            progress(1, x[:, -1:])
        if not state.active.any():
            break
    return SampleOutput(x, state.lengths, nfe, nfe.clone(), state.reasons, pad)
