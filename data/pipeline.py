"""`get_dataset`: a split's (N, n) rows, from the cache or tokenized into it.

The build loads the split's documents, tokenizes them with `datasets.map` over `data.num_proc`
processes (each document on its own, so the rows do not depend on the process count), then
wraps or pads each map batch and writes the rows memory-mapped (uint16 when V fits, else int32).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.cache import CACHE_FORMAT_VERSION, TokenDataset, hf_cache_dir, load_or_build
from data.config import DataSettings, data_settings, import_datasets, require
from data.options import MAP_BATCH_SIZE, PipelineOptions, cache_name, no_rows
from data.processing import TokenizeBatch, check_pad, pad_rows, wrap_flat
from data.registry import SPLITS
from data.sources import load_texts
from data.streaming import StreamingTokenDataset
from data.vocab import Vocab

if TYPE_CHECKING:  # imported where used: an existing token cache loads without it
    import datasets


def get_dataset(
    data: DataSettings | Mapping[str, Any], vocab: Vocab, split: str, seq_len: int
) -> TokenDataset | StreamingTokenDataset:
    """The tokenized `split` ("train"/"valid") of `data.<split>` as (N, n) rows. data: the
    data settings, or a mapping of data keys (data.config.data_settings).

    n = seq_len, or 2 * seq_len for the text8-crop train split. Loaded from `data.cache_dir`
    when a complete cache with the same options exists, else built there (atomically, by one
    process while the others wait). With `data.streaming=true` (hub datasets or a data.source
    copy) returns a `StreamingTokenDataset` that tokenizes on the fly and is never cached.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = data_settings(data)
    opts = PipelineOptions.from_cfg(data, split, seq_len)
    if opts.streaming:
        return StreamingTokenDataset(opts, vocab, hf_cache_dir(data), data)
    name = cache_name(opts, vocab)
    return load_or_build(
        require(data, "cache_dir"), name, lambda out: _build(opts, vocab, data, out)
    )


def _build(opts: PipelineOptions, vocab: Vocab, data: DataSettings, out_dir: str) -> None:
    """Load the texts, tokenize them in parallel and write the rows and meta.json to out_dir."""
    texts = load_texts(data, opts)
    work = os.path.join(out_dir, ".work")
    os.makedirs(work)
    tokenized = _tokenize_dataset(texts, opts, vocab, work)
    column = tokenized.data.column("input_ids")
    if opts.wrap:
        rows = _write_wrapped(column, opts, vocab, out_dir)
    else:
        rows = _write_padded(column, opts, vocab, out_dir)
    del tokenized, column
    shutil.rmtree(work, ignore_errors=True)
    meta = {"format": CACHE_FORMAT_VERSION, "rows": rows, "options": opts.identity()}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:  # the completeness marker: last
        json.dump(meta, f, indent=1)


def _tokenize_dataset(
    texts: datasets.Dataset, opts: PipelineOptions, vocab: Vocab, work_dir: str
) -> datasets.Dataset:
    """One `input_ids` list per document, by `datasets.map` over `data.num_proc` processes.

    Each document is tokenized on its own, so the result does not depend on the process count.
    """
    datasets = import_datasets("reading and tokenizing a dataset split")

    num_proc = max(1, min(opts.num_proc, math.ceil(len(texts) / MAP_BATCH_SIZE)))
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork after a fast tokenizer
    eos = vocab.eos_id if opts.wrap and opts.insert_eos else None
    function = TokenizeBatch(vocab.tokenizer, opts.column, opts.spec.detokenizer, eos)
    quiet = len(texts) < 20 * MAP_BATCH_SIZE and datasets.is_progress_bar_enabled()
    if quiet:  # no progress bars for small corpora (the embedded default, tests)
        datasets.disable_progress_bars()
    try:
        return _map(texts, function, num_proc, opts, work_dir)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _map(texts, function, num_proc, opts, work_dir) -> datasets.Dataset:
    datasets = import_datasets("reading and tokenizing a dataset split")

    return texts.map(
        function,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=texts.column_names,
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        cache_file_name=os.path.join(work_dir, "tokens.arrow"),
        load_from_cache_file=False,
        new_fingerprint=hashlib.sha256(os.path.abspath(work_dir).encode()).hexdigest()[:16],
        desc=f"Tokenizing {opts.name} ({opts.split})",
    )


def _batch_ids(column: pa.ChunkedArray, start: int, stop: int) -> np.ndarray:
    """The concatenated ids of documents [start, stop) as int64."""
    pieces = [chunk.flatten().to_numpy() for chunk in column.slice(start, stop - start).chunks]
    return np.concatenate(pieces).astype(np.int64) if pieces else np.empty(0, np.int64)


def _storage_dtype(vocab: Vocab) -> np.dtype:
    return np.dtype(np.uint16) if vocab.size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _write_wrapped(column: pa.ChunkedArray, opts: PipelineOptions, vocab: Vocab, out: str) -> int:
    """Rows of every map batch of MAP_BATCH_SIZE documents, written to out/input_ids.npy."""
    n = len(column)
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64) if n else np.zeros(0)
    starts = np.arange(0, n, MAP_BATCH_SIZE)
    body = opts.row_len - 2 if opts.insert_special else opts.row_len
    per_batch = np.add.reduceat(lengths, starts) // body if n else np.zeros(0, np.int64)
    total = int(per_batch.sum())
    if total == 0:
        raise no_rows(opts, int(lengths.sum()))
    array = np.lib.format.open_memmap(
        os.path.join(out, "input_ids.npy"), "w+", _storage_dtype(vocab), (total, opts.row_len)
    )
    row = 0
    for start, count in zip(starts.tolist(), per_batch.tolist(), strict=True):
        if count:
            flat = _batch_ids(column, start, min(start + MAP_BATCH_SIZE, n))
            array[row : row + count] = wrap_flat(
                flat, opts.row_len, vocab.bos_id, vocab.eos_id, opts.insert_special
            )
            row += count
    array.flush()
    del array
    return total


def _write_padded(column: pa.ChunkedArray, opts: PipelineOptions, vocab: Vocab, out: str) -> int:
    """wrap=False: one row per document (the reference's padding='max_length' path)."""
    check_pad(vocab)
    n = len(column)
    if n == 0:
        raise no_rows(opts, 0)
    shape = (n, opts.row_len)
    ids = np.lib.format.open_memmap(
        os.path.join(out, "input_ids.npy"), "w+", _storage_dtype(vocab), shape
    )
    mask = np.lib.format.open_memmap(os.path.join(out, "attention_mask.npy"), "w+", np.uint8, shape)
    for start in range(0, n, MAP_BATCH_SIZE):
        stop = min(start + MAP_BATCH_SIZE, n)
        docs = column.slice(start, stop - start).to_pylist()
        ids[start:stop], mask[start:stop] = pad_rows(
            docs, opts.row_len, opts.insert_special, vocab.tokenizer
        )
    ids.flush()
    mask.flush()
    del ids, mask
    return n
