"""The context a sampler starts from: the prompt layout (`left_pad_prompts`, shared by
sample_eval and the HF generate()), a left-padded prompt and its key validity, and the prompt's
commit into a KV cache."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sampling.denoiser import Denoiser


def prompt_ids(prompts: list[str], vocab) -> list[list[int]]:
    """[BOS] + the ids of each prompt (no special tokens of the tokenizer's own)."""
    return [[vocab.bos_id, *vocab.tokenizer.encode(p, add_special_tokens=False)] for p in prompts]


def check_prompt_length(length: int, block_size: int, window: int) -> None:
    """ValueError unless a prompt of `length` ids (BOS included) leaves room for one block of
    `block_size` tokens in the model's window of `window` tokens."""
    if length + block_size > window:
        raise ValueError(
            f"a prompt of {length} tokens (BOS included) plus one block of {block_size} exceeds "
            f"the model's window of {window} tokens (at most {window - block_size - 1} prompt "
            "tokens fit)"
        )


def left_pad_prompts(
    ids: list[list[int]], bos_id: int, block_size: int, window: int
) -> tuple[Tensor, Tensor]:
    """Rows of ids, each [BOS] + prompt, left-padded with the BOS id to a common multiple of
    the block size. -> tokens (B, P) int64 and validity (B, P) bool (False at padding).
    ValueError for a prompt that leaves no room for a block (`check_prompt_length`)."""
    longest = max(len(row) for row in ids)
    check_prompt_length(longest, block_size, window)
    width = math.ceil(longest / block_size) * block_size
    tokens = torch.full((len(ids), width), bos_id, dtype=torch.long)
    valid = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, seq in enumerate(ids):
        tokens[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        valid[row, width - len(seq) :] = True
    return tokens, valid


def encode_prompts(
    prompts: list[str], vocab, block_size: int, window: int
) -> tuple[Tensor, Tensor]:
    """sample_eval's prompt strings laid out by `left_pad_prompts` (`prompt_ids` each)."""
    return left_pad_prompts(prompt_ids(prompts, vocab), vocab.bos_id, block_size, window)


def start_context(batch_size: int, prompt: Tensor | None, prompt_valid: Tensor | None, device):
    """Initial context: the left-padded prompt (B, P) and its key validity, or nothing."""
    if prompt is None:
        x = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return x, None, torch.zeros(batch_size, dtype=torch.long, device=device)
    valid = prompt_valid.to(device)
    return prompt.to(device), valid, (~valid).sum(-1)


def extend_valid(key_valid: Tensor | None, n: int) -> Tensor | None:
    if key_valid is None:
        return None
    return torch.cat([key_valid, key_valid.new_ones(key_valid.shape[0], n)], dim=1)


def prefill(model: Denoiser, x: Tensor, valid: Tensor | None, cache, block: int) -> int:
    """Commit a prompt into the cache block by block; returns the number of commit passes."""
    for end in range(block, x.shape[1] + 1, block):
        model.commit(x[:, :end], None if valid is None else valid[:, :end], cache)
    return x.shape[1] // block
