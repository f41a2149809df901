"""Paths and credentials a run will use, checked before it writes anything: directories it
writes (`check_writable`) or creates (`check_creatable`), and wandb's API key; `yaml_value`
writes a value as the command line does in messages."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

from utils import UserError, filesystem


def yaml_value(value) -> str:
    """A value as it is written on the command line (true, null, 0.5)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_writable(key: str, path: str) -> None:
    """`path` is a directory this process can write in, or can be created as one (fsspec
    URLs are not probed): a probe directory is made and removed in `path` or its nearest
    existing parent (permission bits do not tell: root may create nothing under /proc)."""
    if "://" in path:
        filesystem(path, key)  # an fsspec backend serves it; nothing written or listed
        return
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    why = f"{existing} is not a directory"
    if os.path.isdir(existing):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".bd3lms-probe-", dir=existing))
            return
        except OSError as err:
            why = f"nothing can be created in {existing}: {err.strerror}"
    raise UserError(f"{key}={path} cannot be written ({why}); give a writable directory")


def check_creatable(key: str, path: str) -> None:
    """`path` is a directory, or can be created as one (check_writable). An existing directory
    is not probed: reading what it holds needs no write (the data cache builds what is missing
    and says so then, data.cache.load_or_build)."""
    if "://" in path or os.path.isdir(os.path.expanduser(path)):
        return
    check_writable(key, path)


def check_wandb_credentials(wandb: Mapping[str, Any]) -> None:
    """Online wandb needs an API key; fail now rather than deep inside the first logging call."""
    offline = wandb.get("offline") or wandb.get("mode") in ("offline", "disabled")
    if offline or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    netrc = pathlib.Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
        return
    raise UserError(
        "wandb: no API key (WANDB_API_KEY or `wandb login`); set wandb=null for CSV logs, "
        "+wandb.offline=true, or WANDB_MODE=offline"
    )
