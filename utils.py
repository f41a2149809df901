"""Small stateless helpers shared by every layer: the user-facing error type, fsspec I/O,
atomic writes and rank-zero logging."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator


class UserError(Exception):
    """Bad input that the user can fix: printed as one line by main.py, exit code 2.

    The message must name the offending key or file and say what would be valid.
    """


RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")


def global_rank() -> int:
    """This process's global rank before any process group exists: RANK (torchrun, Lightning's
    own launcher), else SLURM_PROCID (srun, one task per GPU), else LOCAL_RANK, else 0."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return 0


def get_logger(name: str) -> logging.Logger:
    """A logger that emits only on global rank zero (see `global_rank`)."""
    logger = logging.getLogger(name)
    if global_rank() != 0:
        logger.setLevel(logging.ERROR)
    return logger


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary local path next to `path`; rename it onto `path` only on success.

    A crash inside the block leaves no file (or directory) at `path`, so readers never see a
    half-written artefact. Works for files and for directories written by a callee.
    """
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    target = os.path.join(tmp, "payload")
    try:
        yield target
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def filesystem(path: str, key: str):
    """(fsspec filesystem, path within it) of `path`, a local path or fsspec URL; UserError
    naming the config `key` when no installed fsspec backend serves its protocol."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as err:
        raise UserError(
            f"{key}={path}: no fsspec filesystem for it ({first_line(err)}); give a local path "
            "or a URL whose fsspec backend is installed (e.g. s3fs for s3://)"
        ) from None


def first_line(err: BaseException) -> str:
    """An exception as one short line for a UserError message."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


def is_local(fs) -> bool:
    """Whether the fsspec filesystem `fs` is the local one (plain paths and file:// URLs)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def without_file_scheme(path: str) -> str:
    """`path` with a file:// prefix removed: a local path (Lightning's ModelCheckpoint takes
    `file://DIR` for a relative directory named `file:`); other URLs unchanged."""
    return path[len("file://") :] if path.startswith("file://") else path


@contextlib.contextmanager
def local_copy_if_exists(path: str, key: str, directory: str) -> Iterator[str | None]:
    """Yield a local path holding the file at `path` (a local path or fsspec URL, named by the
    config `key` in errors), or None when there is no file there: a local file as it is, a
    remote one downloaded once into a temporary directory under `directory`, removed on exit
    (so that every reader of a resume checkpoint reads the same bytes, fetched once)."""
    fs, target = filesystem(path, key)
    try:
        exists = fs.isfile(target)
    except Exception as err:  # noqa: BLE001 - credentials, network: the user's to fix
        raise UserError(f"{key}={path} cannot be checked ({first_line(err)})") from None
    if not exists:
        yield None
        return
    if is_local(fs):
        yield target
        return
    tmp = tempfile.mkdtemp(prefix=".fetch-", dir=directory)
    local = os.path.join(tmp, os.path.basename(target))
    try:
        fs.get_file(target, local)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Lightning's console lines that say nothing about the run: product tips, its echo of our own
# settings (a limit_*_batches), the TPU / HPU lines (the GPU line stays), the end-of-fit line
# (our progress log has the last step) and the two lines of a resume (main.py logs "resumed at
# step N from PATH")
LIGHTNING_NOISE = (
    "💡 Tip", "was configured so ", "TPU available:", "HPU available:", "`Trainer.fit` stopped:",
    "Restoring states from the checkpoint path at ", "Restored all states from the checkpoint at ",
)  # fmt: skip
KNOWN_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)  # torch 2.13 + Lightning


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in LIGHTNING_NOISE)


def quiet_console() -> None:
    """Silence Lightning's tips and the known third-party deprecation warnings (entry points
    call this once; library code never does)."""
    import warnings

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())


def follow_umask(directory: str) -> None:
    """chmod each file under `directory` to 0666 less the umask: safetensors writes the
    weights 0600, which would leave an export unreadable to the other users of a shared
    directory."""
    umask = os.umask(0)
    os.umask(umask)
    for parent, _, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~umask)
