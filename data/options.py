"""The options of one split read from the data config, and the cache name they give.

`PipelineOptions.from_cfg(data, split, seq_len)` validates every key (UserError naming it);
`cache_name(opts, vocab)` encodes every token-changing option plus the tokenizer's fingerprint,
so two configs share a cache only when they yield the same rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import transformers

from data.cache import CACHE_FORMAT_VERSION
from data.config import DataSettings, data_settings, require
from data.detokenizers import DETOKENIZER_VERSION
from data.registry import DATASETS, OWT_HELD_OUT_DOCS, TEXT8_HELD_OUT_CHARS, DatasetSpec
from data.shakespeare import num_valid_docs
from utils import UserError

if TYPE_CHECKING:
    from data.vocab import Vocab

MAP_BATCH_SIZE = 1000  # the reference's datasets.map(batched=True) batch: wrap groups per batch


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
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
    def from_cfg(
        cls, data: DataSettings | Mapping[str, Any], split: str, seq_len: int
    ) -> PipelineOptions:
        """Read and validate the options of `data` (the data settings, or a mapping of data
        keys); UserError naming the key on a bad value."""
        data = data_settings(data)
        key = f"data.{split}"
        name = require(data, split)
        if name not in DATASETS:
            raise UserError(
                f"{key}={name!r} is not a known dataset: use one of {', '.join(DATASETS)}"
            )
        spec = DATASETS[name]
        streaming = data.streaming
        if streaming and spec.kind not in ("hub", "local"):
            raise UserError(
                f"data.streaming=True works for hub datasets and data.source copies, not "
                f"{key}={name} ({spec.kind}): set data.streaming=False"
            )
        insert_special = getattr(data, f"insert_{split}_special")
        row_len = 2 * seq_len if name == "text8-crop" and split == "train" else seq_len
        if row_len < (3 if insert_special else 1):
            raise UserError(f"model.length={seq_len} is too short: BOS+EOS need model.length >= 3")
        column, source_split = (
            spec.column,
            spec.train_split if split == "train" else spec.valid_split,
        )
        if spec.kind == "local":
            column = data.text_column or column
            source_split = getattr(data, f"{split}_split") or source_split
        return cls(
            key=key,
            name=name,
            split=split,
            source_split=source_split,
            seq_len=seq_len,
            row_len=row_len,
            tokenizer=_sanitise(require(data, "tokenizer_name_or_path")),
            wrap=require(data, "wrap"),
            insert_eos=getattr(data, f"insert_{split}_eos"),
            insert_special=insert_special,
            source=_source_for(data, split, name),
            column=column,
            held_out=_held_out(data, spec),
            num_valid_docs=num_valid_docs(data) if spec.kind == "embedded" else None,
            streaming=streaming,
            num_proc=_num_proc(data),
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


def _source_for(data: DataSettings, split: str, name: str) -> str | None:
    """`data.source` for the train dataset and for a valid dataset of the same family (same hub
    id, e.g. openwebtext-train/-valid); `data.valid_source`, when set, for the valid one."""
    if split == "valid" and data.valid_source:
        return data.valid_source
    if data.source is None:
        return None
    if split == "valid":
        train = DATASETS.get(data.train)
        mine = DATASETS[name]
        if train is None or _family(train) != _family(mine):
            return None
    return data.source


def _family(spec: DatasetSpec) -> tuple:
    return (spec.hub, spec.config, spec.url, spec.kind)


def _held_out(data: DataSettings, spec: DatasetSpec) -> int | None:
    if spec.held_out:
        key, default = "held_out_docs", OWT_HELD_OUT_DOCS
    elif spec.kind == "text8":
        key, default = "held_out_chars", TEXT8_HELD_OUT_CHARS
    else:
        return None
    value = getattr(data, key)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"data.{key}={value!r}: must be a positive integer")
    return value


def _num_proc(data: DataSettings) -> int:
    value = data.num_proc
    if value is None:
        affinity = getattr(os, "sched_getaffinity", None)
        return len(affinity(0)) if affinity else os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"data.num_proc={value!r}: must be a positive integer or null")
    return value


def cache_name(opts: PipelineOptions, vocab: Vocab) -> str:
    """A readable prefix plus a hash of every token-changing option and the tokenizer: its
    definition (`_fingerprint`) and the special ids rows get besides the text's
    (`_special_ids`), which the definition does not fix (a packaged pretrained model's
    document token as BOS / EOS, models.pretrained)."""
    identity = {
        **opts.identity(),
        "tokenizer_fingerprint": _fingerprint(vocab.tokenizer),
        "special_ids": _special_ids(vocab),
    }
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


def _special_ids(vocab: Vocab) -> list[int | None]:
    """The ids the pipeline inserts: the wrapped rows' BOS / EOS (the vocabulary's) and the
    padded rows' BOS / EOS / pad (the tokenizer's, data.processing.pad_rows)."""
    tokenizer = vocab.tokenizer
    return [
        vocab.bos_id, vocab.eos_id,
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    ]  # fmt: skip


def _fingerprint(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    """Short hash of the tokenizer's full definition (vocab, merges, added tokens)."""
    if tokenizer.is_fast:
        definition = tokenizer.backend_tokenizer.to_str()
    else:
        definition = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(definition.encode()).hexdigest()[:10]


def no_rows(opts: PipelineOptions, tokens: int) -> UserError:
    return UserError(
        f"{opts.key}={opts.name!r}: the {opts.split} split ({opts.source_split!r}) yields no row "
        f"of model.length={opts.seq_len} ({tokens} tokens); use a shorter model.length"
    )
