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

from models.hf_causal.attention import ATTENTION_NAME, CleanCausal, hf_attention, predicate_of
from models.hf_causal.backbone import CLEAN_ATTENTION, HFCausalLM, check_supported
from models.hf_causal.cache import HFKVCache
from models.hf_causal.tokens import (
    MASK_TOKEN,
    bos_id,
    ensure_mask_token,
    from_pretrained,
    mask_token_id,
    pretrained_vocab,
)

__all__ = [
    "ATTENTION_NAME", "CLEAN_ATTENTION", "MASK_TOKEN", "CleanCausal", "HFCausalLM", "HFKVCache",
    "bos_id", "check_supported", "ensure_mask_token", "from_pretrained", "hf_attention",
    "mask_token_id", "predicate_of", "pretrained_vocab",
]  # fmt: skip
