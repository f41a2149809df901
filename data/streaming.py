"""`StreamingTokenDataset` (data.streaming=true): a hub split or a `data.source` copy tokenized
on the fly; never cached."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from data.config import DataSettings, import_datasets
from data.loaders import rank_and_world
from data.options import MAP_BATCH_SIZE, PipelineOptions
from data.processing import TokenizeBatch, pad_rows, wrap_flat
from data.sources import from_source, source_hint
from data.vocab import Vocab
from utils import UserError

if TYPE_CHECKING:  # imported where used: an existing token cache loads without it
    import datasets


class StreamingTokenDataset(torch.utils.data.IterableDataset):
    """Tokenizes a streamed split on the fly into the rows of the cached pipeline.

    Consumers open only their own shards (files): with at least `world` shards, rank r streams
    its contiguous run of shards (`rank_stream`), and inside a DataLoader worker `datasets`
    hands each worker its own shards of that run (a worker left without one stops). Each
    (rank, worker) consumer thus reads about 1/C of the documents, and map batches of
    MAP_BATCH_SIZE documents are formed within its shards: the rows are the cached pipeline's
    (as a multiset) whenever every shard holds a multiple of MAP_BATCH_SIZE documents, else
    only the batches that straddle shard boundaries differ. Fallback, with fewer shards than
    ranks: every rank streams all shards and keeps map batch b when b mod world = rank (the
    same rows, at `world` times the reading). Not resumable mid-epoch and not shuffled.
    Training stops at max_steps, not at the end of a pass: a rank whose shards hold fewer rows
    starts its next pass alone (nothing collective happens at an epoch's end), so with shards
    of unequal size the smaller shards' documents are seen more often per step.
    """

    def __init__(
        self, opts: PipelineOptions, vocab: Vocab, hf_cache_dir: str | None, data: DataSettings
    ):
        self.opts, self.vocab, self.hf_cache_dir = opts, vocab, hf_cache_dir
        self.data = data

    def _stream(self) -> datasets.IterableDataset:
        datasets = import_datasets("streaming a dataset split")
        opts, spec = self.opts, self.opts.spec
        if opts.source is not None:
            stream, column = from_source(
                self.data, opts, opts.source, opts.source_split, streaming=True
            )
            return stream.rename_column(column, opts.column) if column != opts.column else stream
        try:
            return datasets.load_dataset(
                spec.hub,
                spec.config,
                split=opts.source_split,
                revision=spec.revision,
                cache_dir=self.hf_cache_dir,
                streaming=True,
            )
        except Exception as err:
            raise UserError(
                f"{opts.key}={opts.name}: could not stream {spec.hub!r}: "
                f"{type(err).__name__}; set data.streaming=False and {source_hint(opts)}"
            ) from err

    def rank_stream(self, rank: int, world: int) -> tuple[datasets.IterableDataset, bool]:
        """(what rank `rank` of `world` streams, whether that is its own shards only)."""
        stream = self._stream()
        if world > 1 and stream.n_shards >= world:
            return stream.shard(num_shards=world, index=rank, contiguous=True), True
        return stream, world == 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        opts, vocab = self.opts, self.vocab
        rank, world = rank_and_world(None, None)
        eos = vocab.eos_id if opts.wrap and opts.insert_eos else None
        tokenize = TokenizeBatch(vocab.tokenizer, opts.column, opts.spec.detokenizer, eos)
        if opts.spec.held_out:
            raise UserError(
                f"{opts.key}={opts.name}: the held-out slice needs the split's length; "
                "set data.streaming=False"
            )
        stream, own = self.rank_stream(rank, world)
        batch: list[str] = []
        index = 0
        for example in itertools.chain(stream, [None]):  # in a worker: its shards only
            if example is not None:
                batch.append(example[opts.column])
                if len(batch) < MAP_BATCH_SIZE:
                    continue
            if batch and (own or index % world == rank):
                yield from self._rows(tokenize({opts.column: batch})["input_ids"])
            batch, index = [], index + 1

    def _rows(self, docs: list[list[int]]) -> Iterator[dict[str, torch.Tensor]]:
        opts, vocab = self.opts, self.vocab
        if opts.wrap:
            flat = np.asarray([t for doc in docs for t in doc], dtype=np.int64)
            rows = wrap_flat(flat, opts.row_len, vocab.bos_id, vocab.eos_id, opts.insert_special)
            mask = np.ones(rows.shape, dtype=np.float32)
        else:
            rows, mask = pad_rows(docs, opts.row_len, opts.insert_special, vocab.tokenizer)
        for ids, m in zip(rows, mask, strict=True):
            yield {
                "input_ids": torch.from_numpy(ids.astype(np.int64)),
                "attention_mask": torch.from_numpy(m.astype(np.float32)),
            }
