"""Documents to rows: detokenise and tokenize a batch, wrap it or pad it.

All functions work on one map batch of MAP_BATCH_SIZE documents (or fewer, the last one) and
return fixed-length rows; the cached pipeline and the streaming dataset share them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import transformers

from data.detokenizers import DETOKENIZERS
from data.vocab import Vocab
from utils import UserError


class TokenizeBatch:
    """The datasets.map function: detokenise, tokenize without special tokens, append EOS."""

    def __init__(self, tokenizer, column: str, detokenizer: str | None, eos_id: int | None):
        self.tokenizer, self.column, self.eos_id = tokenizer, column, eos_id
        self.detokenizer = detokenizer

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t if t is not None else "" for t in batch[self.column]]
        if self.detokenizer is not None:
            texts = [DETOKENIZERS[self.detokenizer](t) for t in texts]
        ids = _tokenize(self.tokenizer, texts)
        if self.eos_id is not None:
            ids = [doc + [self.eos_id] for doc in ids]
        return {"input_ids": ids}


def _tokenize(tokenizer: transformers.PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of every text, without special tokens and without truncation."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def wrap_flat(flat: np.ndarray, row_len: int, bos_id: int, eos_id: int, special: bool):
    """Cut one map batch's concatenated ids into rows of row_len ([BOS] + body + [EOS] when
    `special`, bodies of row_len - 2); the remainder is dropped. Returns (k, row_len) int64."""
    body = row_len - 2 if special else row_len
    count = flat.size // body
    rows = flat[: count * body].reshape(count, body)
    if not special:
        return rows
    out = np.empty((count, row_len), dtype=np.int64)
    out[:, 0], out[:, 1:-1], out[:, -1] = bos_id, rows, eos_id
    return out


def pad_rows(
    docs: Sequence[Sequence[int]], row_len: int, special: bool, tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """One row per document, truncated/padded to row_len, and its 0/1 mask (uint8).

    With `special` each row is [BOS] + doc + [EOS] with the tokenizer's own bos/eos ids (what
    the reference's add_special_tokens=True gives, e.g. [CLS]/[SEP] for BERT).
    """
    ids = np.full((len(docs), row_len), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(docs), row_len), dtype=np.uint8)
    for i, doc in enumerate(docs):
        doc = list(doc)
        if special:
            doc = [tokenizer.bos_token_id, *doc[: row_len - 2], tokenizer.eos_token_id]
        doc = doc[:row_len]
        ids[i, : len(doc)] = doc
        mask[i, : len(doc)] = 1
    return ids, mask


def check_pad(vocab: Vocab) -> None:
    if vocab.tokenizer.pad_token_id is None:
        raise UserError("data.wrap=False needs a tokenizer with a pad token: set data.wrap=True")
