"""Loading a pretrained causal LM for this backbone, and its special tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.hf_causal.backbone import HFCausalLM

MASK_TOKEN = "<|mask|>"


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
