"""Raw documents of one split: `load_texts(data, opts) -> datasets.Dataset`.

Sources: the embedded corpus, text8, the hub id of the split's `DatasetSpec`, or a `data.source`
copy (a directory, fsspec URL or single file) searched recursively for `{split}.{ext}`,
`{split}-*.{ext}` or `{split}/*.{ext}` with ext parquet, jsonl or txt (txt: one row per line).
Every failure is a one-line UserError naming the key and saying what was expected.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.parquet

from data.cache import hf_cache_dir
from data.config import DataSettings, hub_offline, import_datasets
from data.options import PipelineOptions
from data.shakespeare import shakespeare_docs, split_docs
from data.text8 import text8_chunks
from utils import UserError

if TYPE_CHECKING:  # imported where used: an existing token cache loads without it
    import datasets

SOURCE_EXTS = ("parquet", "jsonl", "txt")


def load_texts(data: DataSettings, opts: PipelineOptions) -> datasets.Dataset:
    """The raw documents of one split, in a fixed order, as a Dataset with `opts.column`."""
    datasets = import_datasets("reading and tokenizing a dataset split")

    spec = opts.spec
    if spec.kind == "embedded":
        train_docs, valid_docs = split_docs(shakespeare_docs(), opts.num_valid_docs)
        docs = train_docs if opts.split == "train" else valid_docs
        return datasets.Dataset.from_dict({opts.column: [text for _, text in docs]})
    if spec.kind == "text8":
        return text8_chunks(opts)
    if opts.source is not None:
        dataset, column = from_source(data, opts, opts.source, opts.source_split)
    elif spec.kind == "local":
        raise UserError(
            f"{opts.key}=local needs data.source=PATH_OR_URL: a directory (or fsspec URL) "
            f"holding {opts.source_split}.parquet|jsonl|txt files with column {opts.column!r}"
        )
    else:
        dataset, column = _from_hub(data, opts), opts.column
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


def _hold_out(dataset: datasets.Dataset, opts: PipelineOptions) -> datasets.Dataset:
    """openwebtext-train: all but the last `data.held_out_docs` documents; -valid: those."""
    n, held = len(dataset), opts.held_out
    if held >= n:
        raise UserError(
            f"data.held_out_docs={held} must be below the {n} documents of {opts.name}'s "
            f"{opts.source_split!r} split; lower it for a small copy"
        )
    rows = range(0, n - held) if opts.spec.held_out == "head" else range(n - held, n)
    return dataset.select(rows)


def source_hint(opts: PipelineOptions) -> str:
    split = opts.source_split
    return (
        f"point data.source=PATH_OR_URL at a copy holding {split}.parquet, {split}-*.parquet, "
        f"{split}.jsonl or {split}.txt with column {opts.column!r}"
    )


def _from_hub(data: DataSettings, opts: PipelineOptions) -> datasets.Dataset:
    """The split from the hub (or a remote file); UserError in one line when unreachable."""
    datasets = import_datasets("reading and tokenizing a dataset split")

    spec = opts.spec
    try:
        if spec.url is not None:
            return datasets.load_dataset(
                "json", data_files=spec.url, split="train", cache_dir=hf_cache_dir(data)
            )
        return datasets.load_dataset(
            spec.hub,
            spec.config,
            split=opts.source_split,
            revision=spec.revision,
            cache_dir=hf_cache_dir(data),
        )
    except Exception as err:  # the hub raises many types (ConnectionError, OSError, ValueError)
        offline = " (offline: HF_HUB_OFFLINE=1)" if hub_offline(datasets=True) else ""
        what = spec.url if spec.hub is None else spec.hub
        raise UserError(
            f"{opts.key}={opts.name}: could not load {what!r}{offline}: {type(err).__name__}; "
            f"{source_hint(opts)}"
        ) from err


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


def from_source(
    data: DataSettings, opts: PipelineOptions, source: str, split: str, streaming: bool = False
) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
    """The split from a `data.source` copy and the column holding its text; with `streaming`
    an IterableDataset with one shard per file."""
    files, ext = _find_split_files(source, split, opts.spec.config, opts.key)
    if _all_empty(files, ext):
        raise UserError(
            f"{opts.key}={opts.name}: split {split!r} of data.source={source!r} is empty "
            f"({files[0]}); point data.source at a copy whose {split} split has documents"
        )
    datasets = import_datasets("reading and tokenizing a dataset split")

    builder = {"parquet": "parquet", "jsonl": "json", "txt": "text"}[ext]
    try:
        dataset = datasets.load_dataset(
            builder,
            data_files=files,
            split="train",
            cache_dir=hf_cache_dir(data),
            streaming=streaming,
        )
    except Exception as err:
        raise UserError(
            f"data.source={source!r}: could not read {files[0]} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err
    if ext == "txt":
        return dataset, "text"
    if dataset.column_names is not None and opts.column not in dataset.column_names:
        raise UserError(
            f"data.source={source!r}: {files[0]} has columns {dataset.column_names} but "
            f"{opts.key}={opts.name} reads column {opts.column!r} (the hub dataset's column)"
        )
    return dataset, opts.column
