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


def mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token id, a new special token MASK_TOKEN added when it has none
    (its id: len(tokenizer) before, i.e. the first spare embedding row when the embedding
    has more rows than the tokenizer, as Qwen's, else one past them). Mutates the tokenizer."""
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer.mask_token_id


def ensure_mask_token(model: nn.Module, tokenizer) -> int:
    """The mask id (`mask_token_id`) with its embedding row: a spare row when the embedding has
    rows beyond len(tokenizer) (Qwen), else a new row added with resize_token_embeddings
    (initialised to the mean of the existing rows; a tied output layer stays tied, an untied
    one gets its mean row too). Mutates both."""
    mask_id = mask_token_id(tokenizer)
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


def pretrained_vocab(name_or_path: str, cache_dir: str | None = None):
    """The data.vocab.Vocab of the pretrained model `name_or_path` (models.pretrained: a
    directory, hub id, .gguf file or packaged name), as `from_pretrained` makes it without
    loading its weights: its tokenizer with the mask token (`mask_token_id`), V the embedding
    rows with the mask row (`ensure_mask_token`), BOS falling back to EOS and EOS to BOS."""
    from data.vocab import Vocab
    from models.pretrained import load_tokenizer

    tokenizer, config = load_tokenizer(name_or_path, cache_dir=cache_dir, key="model.pretrained")
    mask_id = mask_token_id(tokenizer)
    size = max(int(config.vocab_size), mask_id + 1)
    bos = bos_id(tokenizer)
    eos = bos if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    return Vocab(tokenizer=tokenizer, mask_id=mask_id, size=size, bos_id=bos, eos_id=eos)


def bos_id(tokenizer) -> int:
    """The BOS id, falling back to EOS (Qwen has no BOS)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token")
    return bos
