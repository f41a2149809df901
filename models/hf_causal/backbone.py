"""HFCausalLM: the backbone (see the package docstring)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.attention import (
    AttentionMask,
    BandedBlockCausalMask,
    BlockCausalMask,
    BlockDiffusionMask,
    CausalMask,
    MaskCache,
    dense_mask,
)
from models.backbone import InferenceScope
from models.hf_causal.attention import (
    ATTENTION_NAME,
    CALL_KEYWORD,
    AttentionCall,
    CleanCausal,
    check_window,
    predicate_of,
)
from models.hf_causal.cache import HFKVCache

CLEAN_ATTENTION = ("causal", "block")
ATTN_BACKENDS = ("sdpa", "flex")  # flash-attention cannot express the block-diffusion mask
# families with a learned absolute-position table: the config key of its length
ABSOLUTE_POSITIONS = {"gpt2": "n_positions"}


class HFCausalLM(InferenceScope, nn.Module):
    """A transformers causal LM run through the project's layouts (see the package docstring);
    a token backbone (models.backbone.Backbone).

    model: a built transformers causal LM (PreTrainedModel with an output embedding), switched
    to ATTENTION_NAME here. token_shift, clean_attention: see the package docstring.
    attn_backend: "sdpa" (CPU and GPU; the only one with a CPU backward) or "flex" (GPU).
    gradient_checkpointing: recompute each decoder layer in the backward (non-reentrant).
    """

    time_conditioned = False  # sigma never reaches the network

    def __init__(
        self,
        model: nn.Module,
        *,
        token_shift: bool = True,
        clean_attention: str = "causal",
        attn_backend: str = "sdpa",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        check_supported(model)
        if clean_attention not in CLEAN_ATTENTION:
            raise ValueError(
                f"model.clean_attention={clean_attention!r}: valid values are {CLEAN_ATTENTION}"
            )
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"model.attn_backend={attn_backend!r}: valid values {ATTN_BACKENDS}")
        model.set_attn_implementation(ATTENTION_NAME)
        if gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers before 5.24 (the GPU image's 5.17) names it differently
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        self.model = model
        self.token_shift = token_shift
        self.clean_attention = clean_attention
        self.attn_backend = attn_backend
        self.masks = MaskCache(attn_backend)
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        key = ABSOLUTE_POSITIONS.get(config.model_type)
        self.max_positions = getattr(config, key) if key else None
        # for an early refusal in new_kv_cache; every call checks the window each layer gets
        windows = [
            w for m in model.modules() if isinstance(w := getattr(m, "sliding_window", None), int)
        ]
        self.sliding_window = min(windows) if windows else None

    # --- the contract's attributes -----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """V: rows of the input embedding (may exceed len(tokenizer), e.g. Qwen's padding)."""
        return self.model.get_input_embeddings().num_embeddings

    def fsdp_units(self) -> set[type]:
        """The decoder-layer classes (transformers' `_no_split_modules`): one FSDP unit each;
        embeddings and a tied head stay in the root unit."""
        names = set(getattr(self.model, "_no_split_modules", None) or ())
        return {type(m) for m in self.model.modules() if type(m).__name__ in names}

    def new_kv_cache(self, batch_size: int, window: int, block_size: int, device) -> HFKVCache:
        """A cache with `window` tokens visible (committed + current block); keys of every
        attention head (KV heads repeated), post-rotary, at positions counting real tokens."""
        check_window(window, self.sliding_window, "sampling window")
        config = self.model.config
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return HFKVCache(
            layers, batch_size, heads, head_dim, window, block_size, device,
            causal_commit=self.clean_attention == "causal",
        )  # fmt: skip

    def set_kv_cache(self, cache: HFKVCache | None) -> None:
        """Install a cache made by new_kv_cache (forward then reads one block through it), or
        remove it (None)."""
        if cache is not None and not isinstance(cache, HFKVCache):
            raise TypeError("HFCausalLM needs its own cache: make it with new_kv_cache")
        super().set_kv_cache(cache)

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        *,
        positions: Tensor,
        mask: Any = None,
        sigma: Tensor | None = None,
        outputs: slice | Tensor | None = None,
        commit: bool = False,
        block_valid: Tensor | None = None,
        key_valid: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, S) -> logits at `outputs`.

        positions: (S,) positions (0..L-1 twice for [x_t ; x_0]; absolute with a cache).
        mask: the attention predicate (models.attention), or a materialised AttentionMask that
        names it (see predicate_of): BlockDiffusionMask(L, K) for the 2L input [x_t ; x_0];
        BlockCausalMask / BandedBlockCausalMask for [clean ; noisy block] sampled without a
        cache (the last block is the noisy one); None for full attention over x_t (MDLM);
        CausalMask for plain next-token logits (algo=ar, token_shift=False). The backbone
        materialises it itself: with clean_attention="causal" the clean rows become
        token-causal (CleanCausal). Ignored with a cache installed. sigma: unused (no time
        conditioning).
        outputs: None (all, (B, S, V)), a slice ((B, S', V)), a boolean (B, S') selection
        ((N, V), row-major; S' <= S) or long (B, k) positions ((B * k, V), row-major).
        With a cache installed (set_kv_cache): tokens are the current block (B, K) or, with
        commit, a clean block then the next block (B, 2K) (models/kv_cache.py); commit stores
        the clean block; block_valid (B, K) is False at prompt padding.
        key_valid: (B, S) False at prompt padding (no cache): real tokens never attend it;
        by default the mask's `key_valid` attribute when it has one.
        """
        del sigma
        B, S = tokens.shape
        device = tokens.device
        cache = self.kv_cache
        if cache is None and (commit or block_valid is not None):
            raise ValueError("commit and block_valid need a KV cache installed (set_kv_cache)")
        if cache is not None:
            position_ids, call = self._cached_call(positions, commit, block_valid, B, S)
        else:
            if key_valid is None:  # prompt padding, when the materialised mask carries it
                key_valid = getattr(mask, "key_valid", None)
            mask = predicate_of(mask)
            position_ids, call = self._uncached_call(mask, positions, key_valid, B, S, device)
        hidden = self.model.base_model(
            input_ids=tokens, position_ids=position_ids, use_cache=False, **{CALL_KEYWORD: call}
        ).last_hidden_state
        readout = self._readout(hidden, mask, cache)
        if cache is not None and commit:
            K = cache.block_size
            cache.last_hidden = hidden[:, K - 1 : K].detach()
        return self._head(readout, outputs)

    def _uncached_call(
        self, mask, positions, key_valid, B, S, device
    ) -> tuple[Tensor, AttentionCall]:
        if isinstance(mask, CausalMask) and self.token_shift:
            raise ValueError(
                "causal (next-token) logits are already shifted: build hf_causal with "
                "token_shift=False for algo=ar"
            )
        predicate = self._clean_mask(mask, S)
        materialised = self.masks.get(predicate, S, S, device)
        position_ids = positions.expand(B, S)
        if key_valid is not None and not bool(key_valid.all()):
            base = dense_mask(predicate, S, S, device) if predicate is not None else None
            if materialised.causal:
                base = torch.ones(S, S, dtype=torch.bool, device=device).tril()
            same_kind = key_valid[:, :, None] == key_valid[:, None, :]
            dense = same_kind if base is None else same_kind & base
            materialised = AttentionMask(dense=dense[:, None])
            pad_before = torch.cumsum(~key_valid, dim=1)
            position_ids = (position_ids - pad_before).clamp(min=0)
        self._check_positions(S // (2 if isinstance(mask, BlockDiffusionMask) else 1))
        return position_ids, AttentionCall(materialised, self.attn_backend, self._span(mask, S))

    def _cached_call(self, positions, commit, block_valid, B, S) -> tuple[Tensor, AttentionCall]:
        cache = self.kv_cache
        position_ids = positions.expand(B, S) - cache.pad_count[:, None]
        if block_valid is not None:
            position_ids = (position_ids - torch.cumsum(~block_valid, dim=1)).clamp(min=0)
        self._check_positions(cache.num_committed * cache.block_size + S)
        window = cache.capacity + cache.block_size
        call = AttentionCall(None, self.attn_backend, window, cache, commit, block_valid)
        return position_ids, call

    def _clean_mask(self, mask, S: int):
        """The predicate this call attends under: `mask`, with token-causal clean rows when
        clean_attention is "causal"."""
        if self.clean_attention != "causal":
            return mask
        if isinstance(mask, BlockDiffusionMask):
            return CleanCausal(mask, 0, mask.seq_len)
        if isinstance(mask, (BlockCausalMask, BandedBlockCausalMask)):
            return CleanCausal(mask, S - mask.block_size, S)
        return mask

    @staticmethod
    def _span(mask, S: int) -> int:
        """The most positions one query sees (for the sliding-window check)."""
        if isinstance(mask, BlockDiffusionMask):
            return mask.seq_len
        if isinstance(mask, BandedBlockCausalMask):
            return min(S, mask.block_size * mask.window_blocks)
        return S

    def check_length(self, length: int, key: str = "model.length") -> None:
        """ValueError starting with `key=length` when rows of `length` tokens reach beyond the
        model's absolute positions (GPT-2's n_positions) or its sliding window (a query of
        the 2L pass sees up to `length` positions)."""
        try:
            self._check_positions(length)
            check_window(length, self.sliding_window, key)
        except ValueError as err:
            raise ValueError(f"{key}={length}: {err}") from None

    def _check_positions(self, length: int) -> None:
        if self.max_positions is not None and length > self.max_positions:
            raise ValueError(
                f"sequence of {length} positions: {self.model.config.model_type} has learned "
                f"absolute positions for {self.max_positions} only; use at most that length"
            )

    def _readout(self, hidden: Tensor, mask, cache: HFKVCache | None) -> Tensor:
        """(B, S, D) hidden states aligned with the output positions: position i's logit is
        read from readout[:, i] (see the package docstring for the token shift)."""
        if not self.token_shift:
            return hidden
        S = hidden.shape[1]
        if cache is not None:  # one stream; the block's first position reads the cache
            previous = cache.last_hidden if cache.last_hidden is not None else hidden[:, :1]
            return torch.cat([previous, hidden[:, :-1]], dim=1)
        source = torch.arange(S, device=hidden.device) - 1
        if isinstance(mask, BlockDiffusionMask):
            L, K = mask.seq_len, mask.block_size
            starts = torch.arange(0, L, K, device=hidden.device)
            source[starts] = starts + L - 1  # a block start reads the previous clean token
            source[L:] += 1  # x_0 rows: the clean stream's own next-token logits
        source[0] = 0
        return hidden[:, source]

    def _head(self, h: Tensor, outputs) -> Tensor:
        if isinstance(outputs, slice):
            h = h[:, outputs]
        elif outputs is not None and outputs.dtype == torch.bool:
            h = h[:, : outputs.shape[1]][outputs]
        elif outputs is not None:
            h = h.gather(1, outputs[..., None].expand(-1, -1, h.shape[-1])).flatten(0, 1)
        logits = self.model.get_output_embeddings()(h)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def check_supported(model: nn.Module) -> None:
    """Refuse, in one line, a model this backbone cannot run exactly."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"model.pretrained: {name} is not a transformers model")
    if getattr(config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        raise ValueError(f"model.pretrained: {name} is not a causal LM (AutoModelForCausalLM)")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"model.pretrained: {name} does not route attention through transformers' "
            "AttentionInterface; hf_causal runs Llama, Qwen2, Qwen3, GPT-2, Gemma3 and other "
            "families that do"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"model.pretrained: {name} caps attention logits (attn_logit_softcapping), which "
            "the project's attention cannot express"
        )
