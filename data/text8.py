"""text8: the reference's character tokenizer and the corpus cut into documents.

The tokenizer has 8 specials then 'a'..'z' and space; the corpus is the 100M characters of
`text8`, split into train/validation/test by `data.held_out_chars` and chunked into documents of
one row each.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import TYPE_CHECKING

import fsspec
import tokenizers
import transformers

from data.config import hub_offline, import_datasets
from data.options import PipelineOptions, no_rows
from utils import UserError

if TYPE_CHECKING:  # imported where used: an existing token cache loads without it
    import datasets

TEXT8_SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
TEXT8_CHARS = "abcdefghijklmnopqrstuvwxyz "


def text8_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The reference's character tokenizer: 8 specials, then 'a'..'z' and space.

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


def text8_chunks(opts: PipelineOptions) -> datasets.Dataset:
    """text8 as documents of row_len characters (2L for the text8-crop train split).

    The raw 100M characters split as train [:-2h], validation [-2h:-h], test [-h:] with
    h = `data.held_out_chars` (5M: the reference's 90M/5M/5M); the last partial chunk is
    dropped. Read from `data.source` ({split}.txt files, or `text8`/`text8.zip`) or the URL.
    """
    raw = _text8_split_text(opts)
    size = opts.row_len
    docs = [raw[i : i + size] for i in range(0, len(raw) - size + 1, size)]
    if not docs:
        raise no_rows(opts, len(raw))
    datasets = import_datasets("reading and tokenizing a dataset split")

    return datasets.Dataset.from_dict({opts.column: docs})


def _text8_split_text(opts: PipelineOptions) -> str:
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
        offline = " (offline)" if hub_offline(datasets=True) else ""
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
