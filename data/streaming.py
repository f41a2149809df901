"""`StreamingTokenDataset` (data.streaming=true, hub datasets only; never cached)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import datasets
import numpy as np
import torch

from data.loaders import rank_and_world
from data.options import MAP_BATCH_SIZE, PipelineOptions
from data.processing import TokenizeBatch, pad_rows, wrap_flat
from data.sources import source_hint
from data.vocab import Vocab
from utils import UserError


class StreamingTokenDataset(torch.utils.data.IterableDataset):
    """Tokenizes a streamed hub split on the fly with the same rows as the cached pipeline.

    Map batch b of MAP_BATCH_SIZE documents goes to consumer b mod C, where the C consumers are
    the (rank, DataLoader worker) pairs. Not resumable mid-epoch and not shuffled.
    """

    def __init__(self, opts: PipelineOptions, vocab: Vocab, hf_cache_dir: str | None):
        self.opts, self.vocab, self.hf_cache_dir = opts, vocab, hf_cache_dir

    def _stream(self):
        spec = self.opts.spec
        try:
            return datasets.load_dataset(
                spec.hub,
                spec.config,
                split=self.opts.source_split,
                revision=spec.revision,
                cache_dir=self.hf_cache_dir,
                streaming=True,
            )
        except Exception as err:
            raise UserError(
                f"{self.opts.key}={self.opts.name}: could not stream {spec.hub!r}: "
                f"{type(err).__name__}; set data.streaming=False and {source_hint(self.opts)}"
            ) from err

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        opts, vocab = self.opts, self.vocab
        rank, world = rank_and_world(None, None)
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        consumers, me = world * workers, rank * workers + worker
        eos = vocab.eos_id if opts.wrap and opts.insert_eos else None
        tokenize = TokenizeBatch(vocab.tokenizer, opts.column, opts.spec.detokenizer, eos)
        if opts.spec.held_out:
            raise UserError(
                f"{opts.key}={opts.name}: the held-out slice needs the split's length; "
                "set data.streaming=False"
            )
        stream = self._stream()
        batch: list[str] = []
        index = 0
        for example in itertools.chain(stream, [None]):
            if example is not None:
                batch.append(example[opts.column])
                if len(batch) < MAP_BATCH_SIZE:
                    continue
            if batch and index % consumers == me:
                docs = tokenize({opts.column: batch})["input_ids"]
                if opts.wrap:
                    flat = np.asarray([t for doc in docs for t in doc], dtype=np.int64)
                    rows = wrap_flat(
                        flat, opts.row_len, vocab.bos_id, vocab.eos_id, opts.insert_special
                    )
                    mask = np.ones(rows.shape, dtype=np.float32)
                else:
                    rows, mask = pad_rows(docs, opts.row_len, opts.insert_special, vocab.tokenizer)
                for ids, m in zip(rows, mask, strict=True):
                    yield {
                        "input_ids": torch.from_numpy(ids.astype(np.int64)),
                        "attention_mask": torch.from_numpy(m.astype(np.float32)),
                    }
            batch, index = [], index + 1
