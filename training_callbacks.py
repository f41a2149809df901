"""Lightning plumbing for long, preemptible runs: atomic checkpoint files, save-and-requeue on
SIGUSR1/SIGTERM, and throughput/memory logging. Public Lightning APIs only."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("bd3lms")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target directory and renames it into
    place, so a crash during a save never leaves a truncated `last.ckpt` for resume to read.
    (fsspec URLs fall back to Lightning's own writer.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class Preemption(L.Callback):
    """On SIGUSR1 (slurm's warning signal) or SIGTERM: save `last_path` at the next batch end
    on every rank, requeue the slurm job (rank 0) and stop. Rerunning the same command (the
    requeued job does) resumes from `last_path`."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, last_path: str):
        self.last_path = last_path
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing and requeueing", signum)
        self.requested = True

    def on_fit_start(self, trainer, pl_module) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_fit_end(self, trainer, pl_module) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        trainer.save_checkpoint(self.last_path)
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job:
            subprocess.run(["scontrol", "requeue", job], check=False)
        trainer.should_stop = True


class Throughput(L.Callback):
    """Logs `trainer/tokens_per_s` (all ranks together) and `trainer/peak_memory_gb` (CUDA
    allocator peak, else the process's max resident set) every `every` optimizer steps."""

    def __init__(self, every: int):
        self.every = max(1, every)
        self._start: float | None = None
        self._tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        if trainer.global_step % self.every or self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        pl_module.log("trainer/tokens_per_s", self._tokens / max(elapsed, 1e-9))
        pl_module.log("trainer/peak_memory_gb", peak)
        self._start, self._tokens = time.perf_counter(), 0
