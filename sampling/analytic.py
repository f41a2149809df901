"""The analytic (Tweedie tau-leaping) sampler of SEDD.

The whole sequence starts masked (BOS at position 0, or after a prompt) and is denoised jointly
over T steps on timesteps linspace(1, eps, T + 1), eps = 1e-5, then once more at t = eps with
the mask forbidden, so no mask survives. Each step, for the step's Delta = sigma(t) - sigma(s):
  staggered score  s e^Delta, plus (1 - e^Delta) sum_v s_v on the mask entry;
  transposed transition of a masked token: (1 - e^-Delta) on every id and 1 on the mask;
  x_s ~ their product.
An unmasked token's transition is e^-Delta on its own id only, so it never changes; the sampler
carries unmasked positions over and draws only at masked ones (the reference draws everywhere
and, when nucleus filtering zeroes a row's own token, would write id 0 there). A masked row is
drawn in two stages with the same law as one categorical over V: stay masked with probability
p_m / sum p (one uniform), and only if not, which token (draws.sample_categorical). Most rows
stay masked at most of the T steps, so this needs about L draws over V in the whole run instead
of T x L (the reference draws a (B, L, V) Gumbel tensor per step).

The network is reached through `score_fn(x (B, S), sigma (B,)) -> log score (B, S, V)`
(algorithms.sedd.SEDD.score_fn). With nucleus_p < 1 the score is first normalised into a
distribution (log-softmax) and then nucleus-filtered: the reference's quirk, kept.

Stop rules are those of sampling.stops.apply_stop_rules, applied once to the finished sequence. With
var_length a sample ends at its first generated EOS (kept): the reference instead rejected
every sample containing one. SEDD sees at most its context: longer requests raise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.base import sigma_from_p
from algorithms.sedd import ScoreFn
from noise_schedule import LogLinear, NoiseSchedule
from sampling.config import SampleOutput, SamplerConfig
from sampling.draws import nucleus, sample_categorical
from sampling.stops import SequenceState, apply_stop_rules

SAMPLER_EPS = 1e-5  # the last time step (reference default)


def _sigma(noise: NoiseSchedule, t: Tensor, sigma_max: float) -> Tensor:
    return sigma_from_p(noise.move_chance(t), sigma_max)


def _score(log_score: Tensor, nucleus_p: float) -> Tensor:
    """(N, V) float32 log scores -> float64 scores; normalised and filtered when p < 1."""
    log_score = log_score.double()
    if nucleus_p >= 1.0:
        return log_score.exp()
    log_probs = log_score - log_score.logsumexp(-1, keepdim=True)
    return nucleus(log_probs.exp(), nucleus_p)


def _step_probs(score: Tensor, delta: Tensor, mask_id: int, final: bool) -> Tensor:
    """Unnormalised x_s probabilities at masked positions.

    score: (N, V) float64 scores; delta: (N,) float32 Delta of each row (float32 like the
    reference's sigma arithmetic). final: the denoising step, where the mask is forbidden."""
    grow = delta.exp()[:, None]  # e^Delta
    extra = (1 - grow[:, 0]) * score.sum(-1)
    staggered = score * grow
    staggered[:, mask_id] += extra
    stay = torch.exp(-delta)[:, None]  # e^-Delta: the own-id (mask) entry of the transition
    leave = 1 - stay  # every id
    probs = staggered * leave
    probs[:, mask_id] = staggered[:, mask_id] * (stay + leave)[:, 0]
    if final:
        probs[:, mask_id] = 0
    return probs


def _update(
    score_fn: ScoreFn,
    x: Tensor,
    sigma: Tensor,
    delta: Tensor,
    cfg: SamplerConfig,
    generator: torch.Generator,
    final: bool,
) -> tuple[Tensor, bool]:
    """One tau-leaping step (or the final denoise). x: (B, S); sigma, delta: (B,) float32.
    Returns the new x and whether the network was called (not when nothing is masked)."""
    masked = x == cfg.mask_id
    if not masked.any():
        return x, False
    log_score = score_fn(x, sigma)[masked]  # (N, V)
    row_delta = delta[:, None].expand(masked.shape)[masked]
    probs = _step_probs(_score(log_score, cfg.nucleus_p), row_delta, cfg.mask_id, final)
    x = x.clone()
    x[masked] = _draw(probs, cfg.mask_id, generator).to(x.dtype)
    return x, True


def _draw(probs: Tensor, mask_id: int, generator: torch.Generator) -> Tensor:
    """(N, V) unnormalised probabilities -> (N,) ids: whether the row stays masked, then, for
    the rows that do not, a token among the others. Negative entries (float rounding, or the
    nucleus quirk's mask entry) count as 0, as they never win the Gumbel race either."""
    probs = probs.clamp(min=0)
    stay = probs[:, mask_id] / probs.sum(-1)
    u = torch.rand(stay.shape, generator=generator, dtype=torch.float64).to(probs.device)
    out = torch.full(stay.shape, mask_id, dtype=torch.long, device=probs.device)
    leave = ~(u < stay)
    if leave.any():
        tokens = probs[leave]
        tokens[:, mask_id] = 0
        out[leave] = sample_categorical(tokens, generator)
    return out


def _initial(
    batch_size: int, cfg: SamplerConfig, prompt: Tensor | None, prompt_valid: Tensor | None, device
) -> tuple[Tensor, int]:
    """[BOS, masks...] or [prompt, masks...], and the index where generation starts."""
    if prompt is None:
        x = torch.full((batch_size, cfg.length), cfg.mask_id, dtype=torch.long, device=device)
        x[:, 0] = cfg.bos_id
        return x, 0
    if prompt_valid is not None and not bool(prompt_valid.all()):
        raise ValueError(
            "SEDD's analytic sampler has no attention mask for left-padded prompts: give "
            "prompts of equal length"
        )
    prompt = prompt.to(device)
    masks = torch.full((batch_size, cfg.length), cfg.mask_id, dtype=torch.long, device=device)
    return torch.cat([prompt, masks], dim=1), prompt.shape[1]


@torch.no_grad()
def analytic_sample(
    score_fn: ScoreFn,
    batch_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: torch.device,
    prompt: Tensor | None = None,
    prompt_valid: Tensor | None = None,
    progress=None,
    *,
    noise: NoiseSchedule | None = None,
    eps: float = SAMPLER_EPS,
) -> SampleOutput:
    """Sample cfg.length tokens (BOS included without a prompt) in cfg.num_steps = T steps.

    Only cfg.length, num_steps, context, bos/mask/eos ids, nucleus_p, var_length and
    reject_low_entropy are read (no blocks, first-hitting or cache). noise: the training
    schedule (log-linear by default); sigma = min(-log(1 - move_chance(t)), sigma_max).
    nfe_denoise is T (the reference's count, final denoise excluded); nfe_total counts every
    network call. All random draws come from `generator` (CPU), so a seed fixes the samples.
    """
    noise = noise if noise is not None else LogLinear()
    sigma_max = getattr(noise, "sigma_max", float("inf"))
    x, gen_start = _initial(batch_size, cfg, prompt, prompt_valid, device)
    total = x.shape[1]
    if total > cfg.context:
        raise ValueError(
            f"SEDD cannot generate beyond its context: {total} tokens requested "
            f"(model.length plus prompt) but the model was trained on {cfg.context}"
        )
    T = cfg.num_steps
    timesteps = torch.linspace(1, eps, T + 1, device=device)  # float32, as the reference
    dt = (1 - eps) / T
    calls = 0
    done = 0
    for i in range(T):
        t = timesteps[i].expand(batch_size)
        sigma_t = _sigma(noise, t, sigma_max)
        delta = sigma_t - _sigma(noise, t - dt, sigma_max)
        x, called = _update(score_fn, x, sigma_t, delta, cfg, generator, final=False)
        calls += called
        if progress is not None:
            step_done = (i + 1) * cfg.length // T
            progress(step_done - done)
            done = step_done
    sigma = _sigma(noise, timesteps[-1].expand(batch_size), sigma_max)
    x, called = _update(score_fn, x, sigma, sigma, cfg, generator, final=True)
    calls += called
    state = SequenceState(
        torch.ones(batch_size, dtype=torch.bool, device=device),
        torch.full((batch_size,), total, dtype=torch.long, device=device),
        ["length"] * batch_size,
    )
    apply_stop_rules(x, gen_start, gen_start, state, cfg)
    nfe_denoise = torch.full((batch_size,), T, dtype=torch.long, device=device)
    nfe_total = torch.full((batch_size,), calls, dtype=torch.long, device=device)
    pad = torch.zeros(batch_size, dtype=torch.long, device=device)
    return SampleOutput(x, state.lengths, nfe_denoise, nfe_total, state.reasons, pad)
