"""The SSD-LM objective (Han, Kumar, Tsvetkov, ACL 2023, Sec. 3): Gaussian diffusion on
"simplex logits" of one block of tokens, given the clean tokens before it, trained by
cross-entropy of the clean block.

Forward process (paper Sec. 3.1-3.2, Eq. for x_t; ssd_model_train.py):

  w_tilde = +K at the token, -K elsewhere           (K = 5, "hardcoded_pseudo_diralpha")
  x_t     = sqrt(abar_t) * w_tilde + sqrt(1 - abar_t) * K * eps,   eps ~ N(0, I)
  abar_t  = f(t) / f(0),  f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2,  s = 1e-4

(`get_time_variables` in ssd_model_train.py, the cosine schedule of Nichol & Dhariwal 2021).
The public training run uses T = 5000 (submit_template_ssd_model_train.sbatch) and decodes
with T = 1000 or 2500; the network only sees t / T, so the two need not match.

Training (ssd_model_train.py): ONE block boundary per batch and step, the context length c
drawn uniformly from {1, ..., L - K} (`np.random.randint(1, max_seq_length - K + 1)`), the
block = x0[:, c : c + K] (K = `decoding_block_size` = 25), the context = x0[:, :c], t drawn
uniformly from {1, ..., T} per row, loss = mean cross-entropy over the block's tokens
(`loss_mode = "xe"`). Tokens after the block are not seen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from algorithms.base import (
    Capabilities,
    Loss,
    Objective,
    SamplingKeys,
    Shard,
    draw_uniform,
    reduce_loss,
)

SCHEDULE_S = 1e-4
SIMPLEX_VALUE = 5.0

# network(context (B, C) int64 or None, x_t (B, K, V) float, t / T (B,)) -> logits (B, K, V);
# it also exposes `vocab_size` (V). models.ssdlm.SSDLMNetwork is one.
SSDLMNet = Callable[[Tensor | None, Tensor, Tensor], Tensor]


def cosine_alpha_bar(t: Tensor | float, num_steps: int, s: float = SCHEDULE_S) -> Tensor:
    """abar_t = f(t) / f(0), f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2, in float64.
    t: any shape (integers 0..T, floats allowed); abar_0 = 1 exactly, abar_T ~ 4e-33."""
    t = torch.as_tensor(t, dtype=torch.float64)

    def f(u: Tensor) -> Tensor:
        return torch.cos((u / num_steps + s) / (1 + s) * (math.pi / 2)) ** 2

    return f(t) / f(torch.zeros_like(t))


def simplex_of(tokens: Tensor, vocab_size: int, value: float = SIMPLEX_VALUE) -> Tensor:
    """tokens (...) int64 -> (..., V) float32: +value at the token, -value elsewhere."""
    return (2 * value) * F.one_hot(tokens, vocab_size).float() - value


def noisy_simplex(
    tokens: Tensor, t: Tensor, num_steps: int, eps: Tensor, value: float = SIMPLEX_VALUE
) -> Tensor:
    """x_t (B, K, V) float32 of tokens (B, K) at integer times t (B,), given eps (B, K, V)."""
    abar = cosine_alpha_bar(t, num_steps).to(device=eps.device, dtype=torch.float32)
    abar = abar.view(-1, 1, 1)
    clean = simplex_of(tokens, eps.shape[-1], value)
    return abar.sqrt() * clean + (1 - abar).sqrt() * value * eps.float()


@dataclasses.dataclass
class SSDLM(Objective):
    """block_size: K tokens diffused per block (25); num_steps: T of training (5000 in the
    public run); simplex_value: K of the +-K simplex (5); min_context: the smallest context
    length drawn (1, as the public code, whose comment says 0 may hang distributed runs);
    max_context: when set, only the last `max_context` tokens before the block are given as
    context, in training and (with sample_context="all") in sampling (an encoder of 512
    positions cannot read longer rows; the public run used rows of 200);
    vocab_size: V of the simplex, None = `network.vocab_size` (set it when the network is
    wrapped, e.g. by DistributedDataParallel, which hides the attribute); top_p: the
    sampling projection's nucleus (0.95, Table 7 of the BD3-LM paper); sample_context:
    "previous_block" | "all" (sampling.ssdlm.SSDLMSamplerOptions)."""

    block_size: int = 25
    num_steps: int = 5000
    simplex_value: float = SIMPLEX_VALUE
    min_context: int = 1
    max_context: int | None = None
    vocab_size: int | None = None
    top_p: float = 0.95
    sample_context: str = "previous_block"
    seq_len: int | None = None  # L of the training rows, when known (recorded, not read)

    sampler = "ssdlm"  # sampling.ssdlm.ssdlm_sample, options from the fields above
    backbone = "roberta"  # models.ssdlm.SSDLMNetwork, not the DiT
    capabilities = Capabilities(
        kv_cache=False,
        prompts=False,
        ppl_eval=False,
        clip_interval=False,
        two_stream=False,
        time_conditioned=True,
        reencodes_window=False,
        # fixed lengths; no first-hitting, parallel decoding or nucleus_p: each step projects
        # one token drawn from its own top-p (algo.top_p)
        sampling_keys=SamplingKeys(
            frozenset({"reject_low_entropy"}), instead=(("nucleus_p", "algo.top_p"),)
        ),
    )
    sampling_keys = capabilities.sampling_keys

    def sampling_blocks(self, window: int, length: int) -> tuple[int, int | None]:
        """(K, stride K): every round appends one block of `block_size` new tokens; the
        window the network was trained on does not constrain the tiling."""
        return self.block_size, self.block_size

    def check_rows(self, seq_len: int) -> None:
        """ValueError unless training rows of `seq_len` tokens hold a context of min_context
        and one block (see `draw`)."""
        if seq_len - self.block_size < self.min_context:
            raise ValueError(
                f"block_size={self.block_size} leaves no context in rows of model.length="
                f"{seq_len}: algo=ssdlm needs block_size <= model.length - {self.min_context}"
            )

    def eval_interval(self) -> tuple[float, float]:
        """SSD-LM has no likelihood bound here: perplexity evaluation is not offered."""
        raise NotImplementedError("SSD-LM has no NELBO evaluation; ppl_eval is not supported")

    def sample_mask(self, window: int, reencode: bool):
        """SSD-LM's sampler (sampling.ssdlm) runs its own encoder, without attention masks."""
        raise NotImplementedError("SSD-LM samples through sampling.ssdlm, not a denoiser mask")

    def log_probs(self, logits: Tensor, x_last: Tensor) -> Tensor:
        """SSD-LM's sampler projects simplexes (sampling.ssdlm), not a denoiser's output."""
        raise NotImplementedError(
            "SSD-LM has no denoiser log-probabilities: it samples through sampling.ssdlm"
        )

    def draw(
        self,
        batch_size: int,
        seq_len: int,
        vocab_size: int,
        device,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> tuple[int, Tensor, Tensor]:
        """The training randomness, in this order: the context length c (one int, uniform in
        min_context..L-K), the times t (B,) int64 uniform in 1..T (drawn for the global batch
        when sharded), the noise eps (B, K, V) float32, drawn one (K, V) row per global-batch
        row so that N shards draw exactly what one process holding the global batch draws.
        All on `device` from `generator` (which must live there) or torch's global RNG."""
        high = seq_len - self.block_size
        if high < self.min_context:
            raise ValueError(
                f"rows of {seq_len} tokens leave no room for a context of {self.min_context} "
                f"and a block of {self.block_size}"
            )
        c = int(torch.randint(self.min_context, high + 1, (1,), generator=generator, device=device))
        u = draw_uniform((batch_size,), device, generator, shard)
        t = (u * self.num_steps).long().clamp(max=self.num_steps - 1) + 1
        size = batch_size if shard is None else shard.size
        rows = [
            torch.randn(self.block_size, vocab_size, generator=generator, device=device)
            for _ in range(size)
        ]
        eps = torch.stack(rows)
        if shard is not None:
            eps = eps[shard.rows.clamp(max=size - 1)]
        return c, t, eps

    def block_nll(
        self, network: SSDLMNet, context: Tensor, block: Tensor, t: Tensor, eps: Tensor
    ) -> Tensor:
        """Per-token cross-entropy (B, K) of the clean block (B, K) from the network's logits
        given the clean context (B, C), times t (B,) in 1..T and noise eps (B, K, V)."""
        xt = noisy_simplex(block, t, self.num_steps, eps, self.simplex_value)
        t_frac = t.to(torch.float32) / self.num_steps
        logits = network(context, xt, t_frac).float()
        nll = F.cross_entropy(logits.flatten(0, 1), block.flatten(), reduction="none")
        return nll.view_as(block)

    def loss(
        self,
        network: SSDLMNet,
        x0: Tensor,
        attention_mask: Tensor,
        eps_min: Tensor,
        eps_max: Tensor,
        *,
        train: bool,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> Loss:
        """x0, attention_mask: (B, L). One boundary c per batch (see `draw`); the loss is the
        block's cross-entropy weighted by attention_mask[:, c:c+K] (reduce_loss; nlls and
        token_mask are (B, K), the block's columns). eps_min / eps_max are unused (t is
        always uniform on 1..T). The BOS is never in the block (c >= 1), so there is no
        ignore_bos."""
        vocab = self.vocab_size or network.vocab_size
        c, t, eps = self.draw(x0.shape[0], x0.shape[1], vocab, x0.device, generator, shard)
        start = 0 if self.max_context is None else max(0, c - self.max_context)
        block = x0[:, c : c + self.block_size]
        nll = self.block_nll(network, x0[:, start:c], block, t, eps)
        return reduce_loss(nll, attention_mask[:, c : c + self.block_size], False, train)
