"""The token cache: `TokenDataset` rows on disk and `load_or_build`, which builds them once.

A cache is a directory `{data.cache_dir}/{name}` holding input_ids.npy (N, n), optionally
attention_mask.npy (N, n), and meta.json, the completeness marker written last. `data.cache_dir`
may be local or an fsspec URL (built in a local mirror and uploaded, marker last).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import filelock
import fsspec
import numpy as np
import torch

from data.config import DataSettings, require
from utils import UserError, atomic_path, get_logger

LOG = get_logger(__name__)

CACHE_FORMAT_VERSION = 2
MARKER = "meta.json"


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
    def path(self) -> str | None:
        """The cache directory the rows were memory-mapped from (its name is the cache name),
        None for in-memory rows."""
        return self._path

    @property
    def input_ids(self) -> torch.Tensor:
        if isinstance(self._ids, torch.Tensor):
            return self._ids
        if self._ids_tensor is None:
            self._ids_tensor = torch.from_numpy(np.asarray(self._ids, dtype=np.int64))
        return self._ids_tensor

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


def load_or_build(cache_dir: str, name: str, build: Callable[[str], None]) -> TokenDataset:
    """The cached dataset `name` under cache_dir; built with `build(tmp_dir)` when missing.

    Readers only trust a directory holding the `meta.json` marker. Locally the directory is
    renamed into place complete; one process builds while the others block on `name.lock`
    (a kernel lock: a killed builder releases it, and its staging directory is discarded).
    For an fsspec URL the cache is built in a local mirror and uploaded, marker last.
    UserError naming data.cache_dir when a missing cache cannot be written there.
    """
    remote = _is_remote(cache_dir)
    local_root = _local_mirror(cache_dir) if remote else _local_path(cache_dir)
    local = os.path.join(local_root, name)
    if _complete(local):
        LOG.info("loading %s from cache %s", name, local)
        return TokenDataset.load(local)
    try:  # FileLock would wait forever on a lock file it cannot create
        os.makedirs(local_root, exist_ok=True)
        open(local + ".lock", "a").close()
    except OSError as err:
        raise UserError(
            f"data.cache_dir={cache_dir}: cannot build the token cache {name} in {local_root} "
            f"({err.strerror}); give a writable directory"
        ) from None
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


def hf_cache_dir(data: DataSettings) -> str | None:
    """Where `datasets` keeps downloads: data.cache_dir/hf when local, else its default."""
    cache_dir = require(data, "cache_dir")
    return None if _is_remote(cache_dir) else os.path.join(_local_path(cache_dir), "hf")


def local_cache_dir(data: DataSettings) -> str:
    """Absolute local directory for tokenizer files: data.cache_dir, or the local mirror of an
    fsspec URL cache_dir."""
    path = require(data, "cache_dir")
    return _local_mirror(path) if _is_remote(path) else _local_path(path)
