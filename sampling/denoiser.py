"""The denoiser: the network as the samplers see it. `Denoiser` is the protocol the samplers
call; `ModelDenoiser` implements it over a token backbone (models.backbone.Backbone: the DiT)
and an objective.

  logprobs(x (B, S), t (B,), num_last, key_valid, cache, commit, commit_previous, rows)
      -> (B, num_last, V) log-probabilities for the last `num_last` positions of x (SUBS for
      diffusion, next-token for AR); with a cache, x[:, -num_last:] is the only new input.
      commit: store that input in the cache (AR). commit_previous: the block of K tokens before
      it is clean and not cached yet: store it in the same call (a fused commit). rows: (B, k)
      ascending positions among the last num_last: only those rows, (B, k, V).
  commit(x, key_valid, cache) -> None: store the clean last block in the cache.
  new_cache(batch_size, block_size) -> KVCache.
  time_conditioned: bool, whether t reaches the network. False lets the DDPM sampler reuse a
      prediction while no token changes (sampling/block.py); a denoiser without the attribute
      is taken as time-conditioned (called at every step, which is right for any network).

Torch only (no Lightning), so the LightningModule, the benchmarks and the GPU script all sample
through this one class.

Without a cache the network reads the whole sequence so far under the objective's sampling mask
(banded to `window` tokens), or, with `reencode` and for MDLM, only the last `window` tokens
re-encoded from position 0 (the reference's behaviour). With a cache it reads just the newest
block at its absolute positions (two blocks for a fused commit, see models/kv_cache.py),
installed on the backbone for the call (`Backbone.inference`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from algorithms.base import process_sigma, sigma_from_p
from models.attention import AttentionMask, dense_mask
from models.backbone import Backbone
from models.kv_cache import KVCache
from models.network import BackboneNetwork


class Denoiser(Protocol):
    def logprobs(
        self,
        x: Tensor,
        t: Tensor,
        num_last: int,
        key_valid: Tensor | None,
        cache: KVCache | None,
        commit: bool = False,
        commit_previous: bool = False,
        rows: Tensor | None = None,
    ) -> Tensor: ...

    def commit(self, x: Tensor, key_valid: Tensor | None, cache: KVCache) -> None: ...

    def new_cache(self, batch_size: int, block_size: int) -> KVCache: ...


class ModelDenoiser:
    """Implements Denoiser over a token backbone (models.backbone.Backbone) and an objective
    (algorithms.base.Objective: its capabilities and its log_probs read-out; MaskedDiffusion
    or Autoregressive).

    A denoiser is a snapshot of the network for inference: its backbone's inference-only
    caches (the DiT's transposed output projection on CPU and constant adaLN modulation) are
    taken from the weights as they are at construction or at the last `prepare_inference()`,
    and read by this denoiser's calls only. Call prepare_inference() (or build a new denoiser)
    after changing the weights; with autograd on the caches are never used."""

    def __init__(
        self,
        backbone: Backbone,
        algorithm,
        window: int,
        reencode: bool = False,
        network: BackboneNetwork | None = None,
    ):
        self.backbone, self.algorithm, self.window = backbone, algorithm, window
        self.network = network or BackboneNetwork(backbone)
        capabilities = algorithm.capabilities
        # t reaches the network only for a time-conditioned objective on a backbone that reads
        # sigma (AR, and models without adaLN, never do)
        self.time_conditioned = capabilities.time_conditioned and backbone.time_conditioned
        self.reencode = reencode or capabilities.reencodes_window
        # the objective's read-out of the logits (SUBS, next-token): (logits, x_last) -> log p
        self.log_probs = algorithm.log_probs
        self.prepare_inference()

    def prepare_inference(self) -> None:
        """(Re)take the backbone's inference snapshot from the current weights (see the class
        docstring)."""
        self._snapshot = self.backbone.prepare_inference()

    def new_cache(self, batch_size: int, block_size: int) -> KVCache:
        """A KV cache for this network. Refused with time conditioning: the cached keys of the
        clean context would be computed at another t than the recomputation (and training)
        uses, which conditions the context on the current block's t."""
        if self.algorithm.capabilities.time_conditioned:
            raise ValueError(
                "sampling.kv_cache=true needs algo.time_conditioning=false: a time-conditioned "
                "model re-encodes its context at every step's t; sample without the cache"
            )
        window = self.window - self.window % block_size
        device = next(self.backbone.parameters()).device
        return self.backbone.new_kv_cache(batch_size, window, block_size, device)

    def logprobs(
        self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False, rows=None
    ) -> Tensor:
        """See Denoiser. rows: (B, k) distinct, ascending positions among the
        last num_last: the output layer then runs on those rows only -> (B, k, V)."""
        if cache is not None:
            K = cache.block_size
            span = 2 * K if commit_previous else K
            outputs = self._outputs(span, num_last, rows)
            logits = self._run_cached(
                x, t, key_valid, cache, commit or commit_previous, outputs, span
            )
            if commit or commit_previous:
                end = x.shape[1] - (K if commit_previous else 0)
                cache.advance(None if key_valid is None else key_valid[:, end - K : end])
            return self._to_logprobs(logits, x[:, -num_last:], rows)
        if self.reencode:
            x = x[:, -self.window :]
            key_valid = None if key_valid is None else key_valid[:, -self.window :]
        S = x.shape[1]
        predicate = self.algorithm.sample_mask(self.window, self.reencode)
        mask = self.network.mask(predicate, S, x.device)
        if key_valid is not None and not bool(key_valid.all()):
            mask = _with_padding(mask, predicate, key_valid)
        positions = self.network.positions(S, 1, x.device)
        outputs = self._outputs(S, num_last, rows)
        with self.backbone.inference(None, self._snapshot):
            logits = self.backbone(
                x, positions=positions, mask=mask, sigma=self._sigma(t, x), outputs=outputs
            )
        return self._to_logprobs(logits, x[:, -num_last:], rows)

    def commit(self, x, key_valid, cache) -> None:
        # t does not reach a cached network (no time conditioning): any t gives the same keys
        clean = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        self._run_cached(x, clean, key_valid, cache, True, slice(0, 0), cache.block_size)
        cache.advance(None if key_valid is None else key_valid[:, -cache.block_size :])

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _outputs(S: int, num_last: int, rows: Tensor | None):
        """Where the output layer runs: the last num_last positions, or the given rows (as
        positions among the S inputs)."""
        return slice(S - num_last, None) if rows is None else rows + (S - num_last)

    def _sigma(self, t: Tensor, x: Tensor) -> Tensor | None:
        """The network's noise level at t (B,), on x's device; None (sigma = 0: the backbone
        serves the constant modulation from its snapshot) without time conditioning."""
        if not self.time_conditioned:
            return None
        sigma = sigma_from_p(t[:, None].float(), self.algorithm.noise_sigma_max)
        return process_sigma(sigma, True).to(x.device)

    def _to_logprobs(self, logits: Tensor, x_last: Tensor, rows: Tensor | None) -> Tensor:
        if rows is not None:  # (B * k, V) in row-major order -> (B, k, V)
            logits = logits.view(rows.shape[0], rows.shape[1], -1)
            x_last = x_last.gather(1, rows)
        return self.log_probs(logits, x_last)

    def _run_cached(self, x, t, key_valid, cache, commit, outputs, span):
        """The last `span` tokens of x (K, or 2K for a fused commit) through the cache."""
        S = x.shape[1]
        block_valid = None
        if key_valid is not None and not bool(key_valid[:, -span:].all()):
            block_valid = key_valid[:, -span:]
        positions = torch.arange(S - span, S, device=x.device)
        with self.backbone.inference(cache, self._snapshot):
            return self.backbone(
                x[:, -span:], positions=positions, mask=None, sigma=self._sigma(t, x),
                outputs=outputs, commit=commit, block_valid=block_valid,
            )  # fmt: skip


def _with_padding(mask: AttentionMask, predicate, key_valid: Tensor) -> AttentionMask:
    """Per-sequence dense mask: real tokens never attend prompt padding; padding attends only
    padding (so every row has a key and values stay finite)."""
    S = key_valid.shape[1]
    base = dense_mask(predicate, S, S, key_valid.device) if predicate is not None else None
    same_kind = key_valid[:, :, None] == key_valid[:, None, :]  # (B, S, S)
    if mask.causal:
        base = torch.ones(S, S, dtype=torch.bool, device=key_valid.device).tril()
    dense = same_kind if base is None else same_kind & base
    predicate = mask.predicate if predicate is None else predicate
    return AttentionMask(dense=dense[:, None], predicate=predicate, key_valid=key_valid)
