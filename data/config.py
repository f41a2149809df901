"""Reading `data.*` settings and the environment the pipeline depends on.

`require` turns a missing key into a UserError naming it; `distribution` finds an installed data
package (read through importlib.metadata, never imported) in DATA_PACKAGES_DIR, where
`make install` puts them outside site-packages, or else on sys.path; `hub_offline` reads the HF
offline flags (for the checkpoint loader too).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any

from utils import UserError

# requirements-data.txt's packages: installed here with `pip install --no-deps --target` so that
# their unneeded declared dependencies do not fail `pip check` (site-packages is not searched).
DATA_PACKAGES_DIR = os.path.join(sys.prefix, "offline-data")
DATA_PACKAGES_HINT = (
    f"pip install --no-deps --upgrade --target {DATA_PACKAGES_DIR} -r requirements-data.txt "
    "(make install does this)"
)


def require(data_cfg: Any, key: str) -> Any:
    """`data_cfg[key]`, or UserError naming `data.<key>` when it is missing or null."""
    value = data_cfg.get(key)
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
