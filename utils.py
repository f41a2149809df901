"""Small stateless helpers shared by every layer: the user-facing error type, fsspec I/O,
atomic writes and rank-zero logging."""

from __future__ import annotations

import contextlib
import logging
import os
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
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# Lightning's console lines that say nothing about the run: product tips, the echo of a
# limit_*_batches we set ourselves. "GPU available" / "LOCAL_RANK" lines are kept.
# Lightning's tips, its echo of our own settings, the TPU / HPU lines (the GPU line stays) and
# the end-of-fit line (our progress log has the last step)
LIGHTNING_NOISE = (
    "💡 Tip", "was configured so ", "TPU available:", "HPU available:", "`Trainer.fit` stopped:"
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
