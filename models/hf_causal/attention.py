"""The attention function this backbone registers with transformers, and its masks (see the
package docstring)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import AttentionMask, CausalMask, attend
from models.kv_cache import KVCache

ATTENTION_NAME = "bd3lm_hf_causal"
CALL_KEYWORD = "bd3lm_call"  # the forward keyword that carries a call's mask or cache


@dataclasses.dataclass(frozen=True)
class CleanCausal:
    """`base` (a predicate, None = full attention) with token-causal clean rows: a query outside
    the noisy rows [noisy_start, noisy_stop) may attend key k only if base allows it and
    k <= q; noisy rows keep base.

    Training ([x_t ; x_0], base BlockDiffusionMask(L, K), noisy rows [0, L)): the x_0 stream
    becomes token-causal (each clean token sees the clean tokens up to itself), the x_t rows
    keep the three-part mask. Sampling without a cache ([clean ; noisy block], base
    BlockCausalMask or BandedBlockCausalMask, noisy rows the last block): committed tokens
    token-causal, the block being denoised sees all of itself."""

    base: Any
    noisy_start: int
    noisy_stop: int

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        noisy = (q >= self.noisy_start) & (q < self.noisy_stop)
        causal = (k <= q) | noisy
        return causal if self.base is None else self.base(q, k) & causal


@dataclasses.dataclass
class AttentionCall:
    """What the attention function needs from one forward: the materialised mask (no cache) or
    the cache with its commit flag and the block's validity; the backend; span, the most
    positions one query sees (checked against a layer's sliding window)."""

    mask: AttentionMask | None
    backend: str
    span: int
    cache: KVCache | None = None
    commit: bool = False
    block_valid: Tensor | None = None


def _dropout_mask(mask: AttentionMask, S_q: int, S_kv: int, device) -> Tensor | None:
    """A dense boolean mask for SDPA with dropout (the chunked and flex paths have none)."""
    if mask.dense is not None:
        return mask.dense
    if mask.causal:
        return torch.ones(S_q, S_kv, dtype=torch.bool, device=device).tril()
    if mask.block_mask is not None:
        raise ValueError("attention dropout needs model.attn_backend=sdpa (flex has no dropout)")
    return None


def hf_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function registered as ATTENTION_NAME (transformers' interface).

    query: (B, H, S, d); key, value: (B, H_kv, S, d) after rotary -> ((B, S, H, d), None).
    The mask or cache comes in kwargs[CALL_KEYWORD] (an AttentionCall); transformers' own mask
    must be None (it builds none for this name). A sliding-window layer
    (kwargs["sliding_window"], as Gemma3, Qwen2 and Mistral pass it) is exact only while no
    query sees more positions than its window: refused beyond."""
    call = kwargs.get(CALL_KEYWORD)
    if call is None or attention_mask is not None:
        raise RuntimeError(
            f"attention {ATTENTION_NAME!r} runs only inside HFCausalLM.forward, which passes "
            "its mask; call the wrapped model through HFCausalLM"
        )
    check_window(call.span, kwargs.get("sliding_window"), "model.length")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    d = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, d**-0.5, rel_tol=1e-12):
        query = query * (scaling * math.sqrt(d))  # attend and the cache scale by 1/sqrt(d)
    if call.cache is not None:
        out = call.cache.attend(module.layer_idx, query, key, value, call.commit, call.block_valid)
    elif dropout > 0:
        dense = _dropout_mask(call.mask, query.shape[2], key.shape[2], query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=dense, dropout_p=dropout)
    else:
        out = attend(query, key, value, call.mask, call.backend)
    return out.transpose(1, 2).contiguous(), None


def check_window(span: int, window: int | None, key: str) -> None:
    """Refuse a call in which a query sees `span` positions, beyond a sliding `window`."""
    if window is not None and span > window:
        raise ValueError(
            f"{key}: a query would see {span} positions, beyond the model's sliding window of "
            f"{window} (hf_causal is exact only within it); use at most {window}"
        )


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, hf_attention)


_register()


def predicate_of(mask: Any) -> Any:
    """The predicate behind a call's mask: a predicate or None (full attention) as given; an
    AttentionMask by its `predicate` attribute when it names one, else by what it says without
    a matrix (causal, full) or its block-diffusion `structure`. The token shift and the clean
    stream need the block structure, which a bare matrix (or flex BlockMask) does not name."""
    if not isinstance(mask, AttentionMask):
        return mask
    predicate = getattr(mask, "predicate", None)
    if predicate is not None:
        return predicate
    if mask.causal:
        return CausalMask()
    if mask.structure is not None:
        return mask.structure
    if mask.dense is None and mask.block_mask is None:
        return None
    raise ValueError(
        "hf_causal reads the attention predicate, not a materialised matrix: pass the "
        "predicate (models.attention) or an AttentionMask with a `predicate` field"
    )
