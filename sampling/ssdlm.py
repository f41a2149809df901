"""SSD-LM's semi-autoregressive sampler with the sampling projection (Han, Kumar, Tsvetkov,
ACL 2023, Sec. 3.3; `decode` and `logits_sampling_projection` in ssd_model_decode_alt.py and
the authors' demo), as the BD3-LM paper's Table 7 runs it: blocks of 25 tokens, T steps each.

One block (B rows, K positions, vocabulary V, simplex value k = 5):

  x_T = k * n,  n ~ N(0, I)                                  (B, K, V)
  for t = T, ..., 1:
      logits  = network(context, x_t, t / T)                 (B, K, V)
      w_hat   = +-k simplex of ONE token sampled from the top-p filtered softmax(logits)
      x_{t-1} = sqrt(abar_{t-1}) * w_hat + sqrt(1 - abar_{t-1}) * k * z,   z ~ N(0, I)
  tokens = argmax(logits of the t = 1 step)

At t = 1, abar_0 = 1 exactly, so x_0 = w_hat: the public code still draws z there and scales
it by 0; here it is not drawn. The block's tokens are the argmax of the last logits (the
public `decode` overwrites `real_token_ids_list` with `argmax(equivalent_score)` at t = 1),
not the sampled w_hat. The top-p filter is SSD-LM's own: a token is kept when the mass of the
tokens ranked above it is < p (so the token crossing p stays; the top-1 always stays).

Tiling a length L: position 0 is the BOS, then ceil((L - 1) / 25) blocks of 25 diffused
positions, the last one truncated to fit (L = 1025: 41 blocks, the 41st keeps 24 tokens;
NFE = 41 T = 41K at T = 1000; L = 2050: 82 blocks, 82K). The last block is diffused at the
full width K and cut rather than diffused narrower: the network is trained on K-position
blocks only, and the first positions of a jointly sampled block are an exact draw of their
marginal under the model, where a narrower noisy block would be an input it never saw.
Context: the previous block (the last 25 tokens; the first block sees only the BOS), or with
context="all" every token so far up to the encoder's positions (the public decoder's choice,
which grows the context).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import torch
from torch import Tensor

from algorithms.ssdlm import SIMPLEX_VALUE, cosine_alpha_bar, simplex_of
from sampling.config import SampleOutput
from sampling.draws import sample_inverse_cdf
from sampling.stops import ENTROPY_WINDOW, STOP_ENTROPY, window_entropy

CONTEXTS = ("previous_block", "all")


@dataclasses.dataclass(frozen=True)
class SSDLMSamplerOptions:
    """simplex_value: k of the +-k simplex (5); top_p: the projection's nucleus (0.95, the
    demo's and Table 7's value); num_steps: T per block, None = the SamplerConfig's
    num_steps; context: "previous_block" | "all"; max_context: with "all", the most context
    tokens (None = the network's max_tokens minus the block)."""

    simplex_value: float = SIMPLEX_VALUE
    top_p: float = 0.95
    num_steps: int | None = None
    context: str = "previous_block"
    max_context: int | None = None

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise ValueError(f"ssdlm context={self.context!r}: valid are {CONTEXTS}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"ssdlm top_p={self.top_p} must lie in [0, 1]")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"ssdlm num_steps={self.num_steps} must be >= 1")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"ssdlm max_context={self.max_context} must be >= 1")


class Draws(Protocol):
    """The sampler's source of randomness: standard normals and U[0, 1) of a shape, float32
    and float64 respectively, on the sampling device."""

    def normal(self, shape: tuple[int, ...]) -> Tensor: ...

    def uniform(self, shape: tuple[int, ...]) -> Tensor: ...


@dataclasses.dataclass
class TorchDraws:
    """Draws from one torch.Generator, made on the generator's device and moved to `device`
    (a CUDA generator avoids copying the (B, K, V) noise of every step)."""

    generator: torch.Generator
    device: Any

    def normal(self, shape):
        where = self.generator.device
        return torch.randn(shape, generator=self.generator, device=where).to(self.device)

    def uniform(self, shape):
        where = self.generator.device
        u = torch.rand(shape, generator=self.generator, device=where, dtype=torch.float64)
        return u.to(self.device)


def top_p_probs(logits: Tensor, top_p: float) -> Tensor:
    """SSD-LM's nucleus over the last axis: softmax (float64), keep the tokens whose
    higher-ranked mass is < top_p (the top-1 always), renormalise. (..., V) -> (..., V)."""
    probs = torch.softmax(logits.double(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    above = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = above < top_p
    keep[..., 0] = True
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def denoise_block(
    network,
    context: Tensor | None,
    batch_size: int,
    block_size: int,
    num_steps: int,
    draws: Draws,
    simplex_value: float = SIMPLEX_VALUE,
    top_p: float = 0.95,
) -> Tensor:
    """One block from pure noise in `num_steps` network calls (module docstring).
    Draw order: normal (B, K, V) for x_T; then per step t: uniform (B, K) for the
    projection, and for t > 1 a normal (B, K, V) for z. Returns tokens (B, K) int64."""
    vocab = network.vocab_size
    shape = (batch_size, block_size, vocab)
    x = simplex_value * draws.normal(shape).float()
    logits = None
    for t in range(num_steps, 0, -1):
        t_frac = torch.full((batch_size,), t / num_steps, dtype=torch.float32, device=x.device)
        logits = network(context, x, t_frac).float()
        probs = top_p_probs(logits, top_p)
        chosen = sample_inverse_cdf(probs, draws.uniform((batch_size, block_size)))
        w_hat = simplex_of(chosen, vocab, simplex_value)
        if t > 1:
            abar = float(cosine_alpha_bar(t - 1, num_steps))
            z = draws.normal(shape).float()
            x = math.sqrt(abar) * w_hat + math.sqrt(1 - abar) * simplex_value * z
        else:
            x = w_hat  # abar_0 = 1
    return logits.argmax(dim=-1)


def num_blocks(length: int, block_size: int) -> int:
    """Blocks that tile `length` tokens after the BOS (the last one truncated)."""
    if length < 2:
        raise ValueError(f"ssdlm: length={length} must count the BOS and at least one token")
    return -(-(length - 1) // block_size)


def ssdlm_sample(
    network,
    batch_size: int,
    cfg,
    generator: torch.Generator,
    device,
    prompt: Tensor | None = None,
    prompt_valid: Tensor | None = None,
    progress=None,
    options: SSDLMSamplerOptions | None = None,
) -> SampleOutput:
    """`batch_size` samples of cfg.length tokens (the BOS included) from an SSD-LM network.

    cfg: a sampling.config.SamplerConfig; read are length, block_size, bos_id, num_steps
    (unless options.num_steps), kv_cache and var_length (both must be False); nucleus_p,
    first_hitting and the parallel-decoding fields do not apply (the projection has its own
    top_p). network: callable (context, x_t, t_frac) -> (B, K, V) logits with attributes
    vocab_size (and max_tokens for context="all" without max_context), e.g.
    models.ssdlm.SSDLMNetwork. All randomness comes from `generator`. Prompts are not
    supported. progress(n) is called after each block with its number of kept tokens. A
    network in training mode is put in eval mode for the call (no dropout) and restored.
    Returns tokens (B, L) int64, lengths L, nfe_denoise = nfe_total = T x blocks per row,
    stop_reason "length" ("rejected_low_entropy" when cfg.reject_low_entropy and the last 256
    tokens have unigram entropy < 4 nats, the rule of the other fixed-length samplers, for
    sampling.generate to redraw), prompt_pad zeros."""
    options = options or SSDLMSamplerOptions()
    if prompt is not None or prompt_valid is not None:
        raise ValueError("the ssdlm sampler does not take prompts")
    if getattr(cfg, "kv_cache", False) or getattr(cfg, "var_length", False):
        raise ValueError("the ssdlm sampler supports neither kv_cache nor var_length")
    steps = options.num_steps or cfg.num_steps
    block, length = cfg.block_size, cfg.length
    blocks = num_blocks(length, block)
    if options.context == "previous_block":
        window = block
    else:
        window = options.max_context or network.max_tokens - block
    draws = TorchDraws(generator, device)
    x = torch.full((batch_size, 1), cfg.bos_id, dtype=torch.long, device=device)
    was_training = getattr(network, "training", False)
    if was_training:
        network.eval()
    try:
        with torch.no_grad():
            for _ in range(blocks):
                context = x[:, max(0, x.shape[1] - window) :]
                tokens = denoise_block(
                    network, context, batch_size, block, steps, draws,
                    options.simplex_value, options.top_p,
                )  # fmt: skip
                keep = min(block, length - x.shape[1])
                x = torch.cat([x, tokens[:, :keep]], dim=1)
                if progress is not None:
                    progress(keep, x[:, x.shape[1] - keep :])
    finally:
        if was_training:
            network.train()
    nfe = torch.full((batch_size,), steps * blocks, dtype=torch.long, device=device)
    reasons = ["length"] * batch_size
    if getattr(cfg, "reject_low_entropy", False) and length > ENTROPY_WINDOW:
        low = window_entropy(x[:, -ENTROPY_WINDOW:]) < STOP_ENTROPY
        reasons = ["rejected_low_entropy" if bad else "length" for bad in low.tolist()]
    return SampleOutput(
        tokens=x,
        lengths=torch.full((batch_size,), length, dtype=torch.long, device=device),
        nfe_denoise=nfe,
        nfe_total=nfe.clone(),
        stop_reason=reasons,
        prompt_pad=torch.zeros(batch_size, dtype=torch.long, device=device),
    )
