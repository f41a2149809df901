"""The implementations the speed work replaced, kept as oracles and as benchmark baselines.

Production code never imports this module. The equivalence tests (tests/test_perf_equivalence.py,
tests/test_properties.py) check the fast paths against these, and `--baseline` of
benchmarks/train.py and benchmarks/sample.py times them side by side with the fast paths:

- `DenseAttentionNetwork` / `without_structure`: SDPA over the dense (2L)^2 training mask
  instead of the chunked block-diffusion attention (models.attention.block_diffusion_attend).
- `unpruned`: the last DiT block computes every position, not only those whose logits are used.
- `DenseNELBO`: the NELBO with logits and SUBS at every position (the reference's dense path)
  instead of at the masked x_t positions only.
- `subs_log_probs_reference`: SUBS as the reference writes it (logits - logsumexp, a full
  one-hot tensor, where).
- `BaselineDenoiser`: the sampler's network calls with the reference SUBS, the adaLN
  modulation recomputed at every call and the output projection reading its (V, D) weight.
- `wrap_documents`: the reference's wrap written out on lists of token ids, batch by batch,
  the oracle of the data pipeline's cached and streamed wrap (data.processing.wrap_flat).
- `reference_draws()`: first-hitting blocks drawn by the reference's Gumbel race over every
  position of the block, and AR tokens by Gumbel-max over the vocabulary (same distributions
  as the inverse-CDF draws of sampling/, other random numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

import sampling.ar as ar_sampler
import sampling.block as block_sampler
from algorithms.base import NEG_INF, process_sigma, reduce_loss
from algorithms.masked_diffusion import MaskedDiffusion
from data.options import MAP_BATCH_SIZE
from data.processing import wrap_flat
from models.attention import AttentionMask
from models.dit import DiT
from models.network import BackboneNetwork
from sampling.context import extend_valid
from sampling.denoiser import ModelDenoiser
from sampling.draws import GUMBEL_EPS, nucleus, sample_categorical, uniforms


# ----------------------------------------------------------------------------------------------
# Training: dense attention, the full last layer, the dense NELBO, the reference SUBS
# ----------------------------------------------------------------------------------------------
def without_structure(mask: AttentionMask) -> AttentionMask:
    """The same mask without its block-diffusion structure: attention then runs as SDPA over
    the dense mask."""
    return dataclasses.replace(mask, structure=None, parts={})


class DenseAttentionNetwork(BackboneNetwork):
    """BackboneNetwork whose training masks are served as dense SDPA masks."""

    def mask(self, predicate, length: int, device) -> AttentionMask:
        return without_structure(super().mask(predicate, length, device))


def unpruned(model: DiT) -> DiT:
    """`model` with the last block computing every position (the prefix pruning of
    DiT._needed_prefix turned off on this instance only). Returns `model`."""
    model._needed_prefix = types.MethodType(lambda self, *args: None, model)
    return model


def subs_log_probs_reference(logits: Tensor, xt: Tensor, mask_id: int) -> Tensor:
    """SUBS log-probabilities (B, L, V) in float32 as the reference computes them."""
    offset = torch.zeros(logits.shape[-1], device=logits.device)
    offset[mask_id] = NEG_INF
    logits = logits.float() + offset
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = (xt != mask_id)[..., None]
    one_hot = torch.full_like(log_probs, NEG_INF).scatter_(-1, xt[..., None], 0.0)
    return torch.where(unmasked, one_hot, log_probs)


@dataclasses.dataclass
class DenseNELBO(MaskedDiffusion):
    """MaskedDiffusion whose NELBO computes logits for all S = L or 2L input positions and
    SUBS over (B, L, V), as the reference does: the same loss, more work."""

    def nelbo(self, network, x0, xt, loss_scale, sigma, attention_mask, train):
        tokens = torch.cat([xt, x0], dim=1) if self.cross_attn else xt
        sigma = process_sigma(sigma, self.time_conditioning)
        layout = dataclasses.replace(self.train_layout, outputs=None)
        logits = network(tokens, sigma, layout)[:, : self.seq_len]  # (B, L, V)
        log_p = subs_log_probs_reference(logits, xt, self.mask_id)
        nll = loss_scale * log_p.gather(-1, x0[..., None])[..., 0]
        return reduce_loss(nll, attention_mask, self.ignore_bos, train)


# ----------------------------------------------------------------------------------------------
# Sampling: the network calls and the draws as first written
# ----------------------------------------------------------------------------------------------
class BaselineDenoiser(ModelDenoiser):
    """ModelDenoiser without its inference caches: the reference SUBS, the adaLN modulation
    recomputed at every call, the output projection reading its (V, D) weight."""

    def prepare_inference(self) -> None:
        self._snapshot = None  # the backbone computes everything at every call
        if isinstance(self.algorithm, MaskedDiffusion):
            mask_id = self.algorithm.mask_id
            self.log_probs = lambda logits, xt: subs_log_probs_reference(logits, xt, mask_id)


def first_hitting_gumbel_race(
    model, context, key_valid, block, cache, cfg, generator, active, num_masked=None,
    commit_previous=False, draft=None,
):  # fmt: skip
    """One block by the reference's first-hitting draw (signature of
    sampling.first_hitting.denoise_first_hitting): per call, each sequence moves its clock
    t <- t u^(1/n) (n masked), samples a token at every position and commits it at one masked
    position chosen by a race of uniforms. -> (block (B, K), NFE (B,))."""
    B, K = block.shape
    t = torch.ones(B, dtype=torch.float64, device=block.device)
    nfe = torch.zeros(B, dtype=torch.long, device=block.device)
    valid = extend_valid(key_valid, K)
    p_x0 = None
    for _ in range(K):
        masked = block == cfg.mask_id
        if not masked.any():
            break
        n = masked.sum(-1)
        u = uniforms((B,), generator, block.device)
        t = torch.where(n > 0, t * u ** (1.0 / n.clamp(min=1)), t)
        if p_x0 is None:
            x = torch.cat([context, block], dim=1)
            log_p = model.logprobs(x, t, K, valid, cache, commit_previous=commit_previous)
            commit_previous = False
            p_x0 = nucleus(log_p.double().exp(), cfg.nucleus_p)
        proposal = sample_categorical(p_x0, generator)
        scores = uniforms(tuple(block.shape), generator, block.device).masked_fill(~masked, -1.0)
        chosen = torch.zeros_like(masked).scatter_(-1, scores.argmax(-1, keepdim=True), True)
        new_block = torch.where(chosen & masked, proposal, block)
        changed = (new_block != block).any(-1)
        nfe += changed & active
        if changed.any():
            p_x0 = None
            if draft is not None:
                draft(new_block)
        block = new_block
    return block, nfe


def gumbel_max_token(probs: Tensor, generator: torch.Generator) -> Tensor:
    """(B, V) probabilities -> (B,) tokens by Gumbel-max over the vocabulary."""
    u = uniforms(tuple(probs.shape), generator, probs.device)
    gumbel = -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)
    return (probs.log() + gumbel).argmax(-1)


@contextlib.contextmanager
def reference_draws():
    """Inside the block, sampling/ draws first-hitting blocks and AR tokens as the reference
    does (parallel decoding is unavailable there)."""
    saved = block_sampler.denoise_first_hitting, ar_sampler.draw_token
    block_sampler.denoise_first_hitting = first_hitting_gumbel_race
    ar_sampler.draw_token = gumbel_max_token
    try:
        yield
    finally:
        block_sampler.denoise_first_hitting, ar_sampler.draw_token = saved


# ----------------------------------------------------------------------------------------------
# Data: the reference's wrap on lists
# ----------------------------------------------------------------------------------------------
def wrap_documents(
    docs_token_ids: Sequence[Sequence[int]],
    seq_len: int,
    bos_id: int,
    eos_id: int,
    insert_eos: bool,
    insert_special: bool,
) -> torch.Tensor:
    """Concatenate documents and cut them into rows, as the reference's wrap.

    Per consecutive batch of MAP_BATCH_SIZE documents (the reference's single-process batched
    map): append `eos_id` after every document when `insert_eos`, concatenate, cut chunks of
    seq_len - 2 tokens emitted as [bos_id] + chunk + [eos_id] when `insert_special` (else plain
    chunks of seq_len), and drop the batch's remainder. Returns a LongTensor (N, seq_len).
    """
    suffix = [eos_id] if insert_eos else []
    blocks = [np.empty((0, seq_len), dtype=np.int64)]
    for start in range(0, len(docs_token_ids), MAP_BATCH_SIZE):
        flat = [
            t for doc in docs_token_ids[start : start + MAP_BATCH_SIZE] for t in [*doc, *suffix]
        ]
        blocks.append(
            wrap_flat(np.asarray(flat, dtype=np.int64), seq_len, bos_id, eos_id, insert_special)
        )
    return torch.from_numpy(np.concatenate(blocks))
