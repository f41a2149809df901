"""A pretrained Hugging Face causal LM as a BD3-LM backbone (issue 26).

`HFCausalLM` wraps any transformers causal LM (an `AutoModelForCausalLM` class whose attention
goes through transformers' AttentionInterface: Llama, Qwen2, Qwen3, GPT-2, Gemma3, ...) and
runs the project's layouts through the model's own layers:

- Attention. The module registers one attention function (`ATTENTION_NAME`) and switches the
  model to it. transformers never builds a mask for that name; each call passes the project's
  mask (or KV cache) to the function through a forward keyword, so the repeated positions of
  the 2L input [x_t ; x_0] never reach transformers' mask builder (which would read them as
  packed sequences). The function repeats KV heads (GQA), applies the module's `scaling`,
  honours attention dropout and calls models.attention.attend (SDPA or flex) or the KV cache.
- Clean stream (`clean_attention`). "block": the paper's block-causal x_0 stream. "causal":
  each clean token sees only earlier clean tokens (the pretrained model's own computation;
  NBDiff, Fast-dLLM v2). The x_t rows are the same in both modes: own block in full, clean
  blocks before it. Sampling follows the mode (`CleanCausal` mask, causal commit in the cache).
- Token shift (`token_shift`, default True): the logit of x_t position i is read from the
  hidden state at i - 1 (x_t stream); at the first position of a block from the last clean token
  of the previous block (x_0 stream, row L + i - 1), so a block's first token is predicted from
  clean context as at inference, and at K = 1 the per-token terms are the causal LM's own
  next-token logits. Position 0 of a sequence has no predecessor: it reads its own hidden state.
  Its term is meaningful only as a prior; train with a BOS at position 0 and ignore_bos (the
  causal LM's NLL has no term for the first token either). Rows of the x_0 half, when asked
  for, are never shifted: row L + i is the clean stream's next-token logit for x_0[i + 1]
  (the auxiliary AR loss reads them; meaningful with clean_attention="causal").
  The uncached sampling input is one stream [clean ; noisy block]: position i reads i - 1.
  The cached sampler carries the last committed token's hidden state in the cache.
- Output layer only at the requested positions (never (B, 2L, V) unless asked), then the
  config's final logit softcapping if any.
- Positions count real tokens: with prompt padding (key_valid / block_valid False) a row's
  positions start at 0 at its first real token (GPT-2's absolute positions need it; rotary
  scores do not change). Absolute-position models refuse positions beyond their table.

Not supported (refused in one line at construction): models without the attention interface,
attention-logit softcapping (Gemma2), encoder-decoders. Sliding-window layers (Gemma3, Qwen2
with use_sliding_window) are exact while every query sees at most `sliding_window` positions
and refused beyond.

The algo=ar baseline reads plain next-token logits: build it with token_shift=False.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import (
    AttentionMask,
    BandedBlockCausalMask,
    BlockCausalMask,
    BlockDiffusionMask,
    CausalMask,
    MaskCache,
    attend,
    dense_mask,
)
from models.backbone import InferenceScope
from models.kv_cache import KVCache

ATTENTION_NAME = "bd3lm_hf_causal"
CALL_KEYWORD = "bd3lm_call"  # the forward keyword that carries a call's mask or cache
CLEAN_ATTENTION = ("causal", "block")
ATTN_BACKENDS = ("sdpa", "flex")  # flash-attention cannot express the block-diffusion mask
# families with a learned absolute-position table: the config key of its length
ABSOLUTE_POSITIONS = {"gpt2": "n_positions"}
MASK_TOKEN = "<|mask|>"


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
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
class _Call:
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
    The mask or cache comes in kwargs[CALL_KEYWORD] (a _Call); transformers' own mask must be
    None (it builds none for this name). A sliding-window layer (kwargs["sliding_window"], as
    Gemma3, Qwen2 and Mistral pass it) is exact only while no query sees more positions than
    its window: refused beyond."""
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


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------
class HFKVCache(KVCache):
    """models.kv_cache.KVCache plus what this backbone carries between calls:

    last_hidden: (B, 1, D) final hidden state of the last committed token (the token shift
      reads it for the first position of the next block), None before the first commit;
    pad_count: (B,) prompt padding committed so far (positions count real tokens);
    causal_commit: a committed block attends token-causally within itself (clean_attention
      "causal"), as the x_0 stream does in training; the ring and the block being denoised
      are as in KVCache."""

    def __init__(self, *args, causal_commit: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.causal_commit = causal_commit
        self.last_hidden: Tensor | None = None
        batch, device = self.valid.shape[0], self.valid.device
        self.pad_count = torch.zeros(batch, dtype=torch.long, device=device)

    def _plan_call(self, n: int, commit: bool, block_valid: Tensor | None) -> tuple:
        plan = super()._plan_call(n, commit, block_valid)
        K = self.block_size
        if not (commit and self.causal_commit) or K == 1:
            return plan
        start, prev_at, cur_at, mask, in_place = plan
        own = (prev_at if n == 2 * K else cur_at) - start  # the committed block's key columns
        device = self.valid.device
        if mask is None:
            mask = torch.ones(n, cur_at + K - start, dtype=torch.bool, device=device)
        else:  # (n, keys) or (B, 1, n or 1, keys)
            mask = mask.expand(*mask.shape[:-2], n, mask.shape[-1]).clone()
        tril = torch.ones(K, K, dtype=torch.bool, device=device).tril()
        mask[..., :K, own : own + K] &= tril
        return start, prev_at, cur_at, mask, in_place

    def advance(self, block_valid: Tensor | None = None) -> None:
        if block_valid is not None:
            self.pad_count += (~block_valid).sum(1)
        super().advance(block_valid)


# ----------------------------------------------------------------------------------------------
# The backbone
# ----------------------------------------------------------------------------------------------
class HFCausalLM(InferenceScope, nn.Module):
    """A transformers causal LM run through the project's layouts (see the module docstring);
    a token backbone (models.backbone.Backbone).

    model: a built transformers causal LM (PreTrainedModel with an output embedding), switched
    to ATTENTION_NAME here. token_shift, clean_attention: see the module docstring.
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
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
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

    def _uncached_call(self, mask, positions, key_valid, B, S, device) -> tuple[Tensor, _Call]:
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
        return position_ids, _Call(materialised, self.attn_backend, self._span(mask, S))

    def _cached_call(self, positions, commit, block_valid, B, S) -> tuple[Tensor, _Call]:
        cache = self.kv_cache
        position_ids = positions.expand(B, S) - cache.pad_count[:, None]
        if block_valid is not None:
            position_ids = (position_ids - torch.cumsum(~block_valid, dim=1)).clamp(min=0)
        self._check_positions(cache.num_committed * cache.block_size + S)
        window = cache.capacity + cache.block_size
        call = _Call(None, self.attn_backend, window, cache, commit, block_valid)
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

    def _check_positions(self, length: int) -> None:
        if self.max_positions is not None and length > self.max_positions:
            raise ValueError(
                f"sequence of {length} positions: {self.model.config.model_type} has learned "
                f"absolute positions for {self.max_positions} only; use at most that length"
            )

    def _readout(self, hidden: Tensor, mask, cache: HFKVCache | None) -> Tensor:
        """(B, S, D) hidden states aligned with the output positions: position i's logit is
        read from readout[:, i] (see the module docstring for the token shift)."""
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


# ----------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------
def from_pretrained(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    key: str = "model.pretrained",
    **options,
) -> tuple[HFCausalLM, Any, int]:
    """-> (backbone, tokenizer, mask_id): the model models.pretrained.load_causal_lm loads
    (a directory, hub id, .gguf file or packaged name), its tokenizer with the mask token
    (ensure_mask_token), wrapped as HFCausalLM(model, **options)."""
    from models.pretrained import load_causal_lm

    model, tokenizer = load_causal_lm(
        name_or_path, gguf_file=gguf_file, cache_dir=cache_dir, dtype=dtype, key=key
    )
    mask_id = ensure_mask_token(model, tokenizer)
    return HFCausalLM(model, **options), tokenizer, mask_id


def ensure_mask_token(model: nn.Module, tokenizer) -> int:
    """The mask id: the tokenizer's mask token; else a new MASK_TOKEN, which takes the first
    spare embedding row when the embedding has rows beyond len(tokenizer) (Qwen), else a new
    row added with resize_token_embeddings (initialised to the mean of the existing rows; a
    tied output layer stays tied, an untied one gets its mean row too). Mutates both."""
    if tokenizer.mask_token_id is not None:
        mask_id = tokenizer.mask_token_id
    else:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
        mask_id = tokenizer.mask_token_id
    rows = model.get_input_embeddings().num_embeddings
    if mask_id < rows:
        return mask_id
    model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            weight = layer.weight
            weight[rows:] = weight[:rows].mean(0)
            bias = getattr(layer, "bias", None)
            if bias is not None and bias.shape[0] == weight.shape[0]:
                bias[rows:] = bias[:rows].mean()
    return mask_id


def bos_id(tokenizer) -> int:
    """The BOS id, falling back to EOS (Qwen has no BOS)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token")
    return bos
