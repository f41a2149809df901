"""Lightning plumbing for long, preemptible runs: atomic checkpoint files (local or fsspec URLs),
save-and-stop on SIGUSR1/SIGUSR2/SIGTERM/Ctrl-C decided by all ranks together (and requeue on
the cluster's), the fine-tuning loading sanity check on rank 0's device, throughput/memory
logging, and progress as log lines."""

from __future__ import annotations

import logging
import os
import resource
import secrets
import signal
import subprocess
import time

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from checkpoints.sanity import SANITY_ROWS, sanity_check_perplexity
from utils import UserError

log = logging.getLogger("bd3lms")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint whole or not at all, so that a crash during a save never leaves a
    truncated `last.ckpt` for resume to read: a local path goes to a temporary file in the
    target directory, fsynced and renamed into place. An fsspec URL (file:// included) goes
    through Lightning's own writer, which serialises the checkpoint in memory first and
    writes it inside an fsspec transaction in one upload (object stores publish an object only
    once its upload is complete). Reading and deleting (keep_last_k) go through fsspec in
    Lightning's TorchCheckpointIO. The file gets the mode of any file the user writes (0666 less
    the umask), not tempfile.mkstemp's 0600."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}.ckpt")
        # the kernel applies the umask to 0666; O_EXCL: never someone else's file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    """Save-and-stop on a signal: the warning signals of a cluster, SIGUSR1 (slurm `--signal`,
    our job template) and SIGUSR2 (submitit's warning signal), SIGTERM, and Ctrl-C (SIGINT).

    A signal handler only records the signal; the ranks decide together at the end of every
    micro-batch (one all-reduce of the signals each has seen), so they save and stop at the same
    step even when the signal reached some of them only, or at different micro-batches (a save
    is collective: a rank saving alone would wait in its barrier for ever).
    SIGUSR1 / SIGUSR2 / a first Ctrl-C request a save at the end of the current optimizer step,
    never inside a gradient accumulation (a checkpoint cannot hold partial gradients, so a save
    there would not resume bit-identically); every rank takes part in saving `last_path` and
    training stops (a warning signal wins over a Ctrl-C seen at the same step), after the
    closing validation Lightning runs whenever a fit is asked to stop.
    After SIGUSR1 / SIGUSR2 the job is requeued by whoever owns the signal: if a Python handler
    was installed for it before training (submitit's, under `hydra/launcher=slurm`), that
    handler is called once fit has ended, so submitit requeues the job and counts its timeouts
    (`max_num_timeout`) as usual (and exits with -1 on global rank 0); otherwise (a plain
    sbatch job) rank 0 runs `scontrol requeue $SLURM_JOB_ID`. A Ctrl-C requeues nothing.
    Ctrl-C: the first one logs that the save will come at the end of the step and puts Python's
    own handler back, so a second one raises KeyboardInterrupt at once: nothing is saved and
    Lightning shuts down (on_exception hooks) and exits with code 1. A Ctrl-C ignored when the
    fit starts (a background job of a non-interactive shell) stays ignored.
    SIGTERM cannot wait: once any rank has it, every rank saves last_path at the end of the
    current micro-batch (mid-accumulation if need be: the resume repeats that step's first
    micro-batches), rank 0 requeues the slurm job, and every rank raises Lightning's
    SIGTERMException there, as Lightning does on SIGTERM, with exit code 143.
    Exit codes: a run stopped by a signal must not read as a finished one (`train && eval`
    would go on), so `exit_code` is the shell's convention for it, 128 + the signal's number
    (Linux: 130 Ctrl-C, 138 SIGUSR1, 140 SIGUSR2, 143 SIGTERM), None when no signal stopped
    the fit; main.py exits with it. The requeue, when there is one, has been asked for before
    the exit, so its code does not matter to slurm.
    Our handlers replace Lightning's from the first training batch on (on_train_start):
    Lightning's SIGTERM handler acts on the receiving rank alone. Rerunning the same command
    (the requeued job does) resumes from `last_path`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
    REQUEUED = (signal.SIGUSR1, signal.SIGUSR2)  # the cluster's warnings; SIGTERM requeues at once

    def __init__(self, last_path: str):
        self.last_path = last_path
        self.received: set[int] = set()  # the signals this rank received, until the save
        self.saved_for: int | None = None  # the signal the save answered, until the requeue
        self.stopped_by: int | None = None  # the signal that stopped this fit
        self._previous: dict = {}

    @property
    def exit_code(self) -> int | None:
        """128 + the number of the signal that stopped the fit; None when none did."""
        return None if self.stopped_by is None else 128 + self.stopped_by

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C
            log.warning(
                "Ctrl-C: saving %s at the end of this optimizer step, then stopping; "
                "Ctrl-C again aborts at once, without saving",
                self.last_path,
            )
        else:
            log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.received.add(signum)

    def on_fit_start(self, trainer, pl_module) -> None:
        # the owners to hand a warning signal to, and to restore: those found before the fit
        self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        self.stopped_by = None

    def on_train_start(self, trainer, pl_module) -> None:
        for sig in self.SIGNALS:
            if sig == signal.SIGINT and self._previous[sig] == signal.SIG_IGN:
                continue  # not a terminal's job: Ctrl-C is not meant for it
            signal.signal(sig, self._handler)

    @staticmethod
    def at_step_boundary(trainer, batch_idx: int) -> bool:
        """True when the optimizer has just stepped (the last micro-batch of an accumulation;
        the same on every rank)."""
        return (batch_idx + 1) % trainer.accumulate_grad_batches == 0

    def decide(self, trainer) -> tuple[bool, int | None]:
        """(whether any rank received SIGTERM, the warning signal any rank received: SIGUSR2
        over SIGUSR1, None for neither), the same on every rank: a collective."""
        warning = max((s for s in self.received if s != signal.SIGTERM), default=0)
        seen = [int(signal.SIGTERM in self.received), int(warning)]
        if trainer.world_size > 1:
            local = torch.tensor(seen, device=trainer.strategy.root_device)
            seen = trainer.strategy.reduce(local, reduce_op="max").tolist()
        return bool(seen[0]), (signal.Signals(seen[1]) if seen[1] else None)

    def _save(self, trainer, signum: int) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)  # all of it, to resume
        log.warning("saved %s at step %d; stopping", self.last_path, trainer.global_step)
        self.saved_for, self.stopped_by, self.received = signum, signum, set()
        trainer.should_stop = True

    @staticmethod
    def _scontrol_requeue(trainer) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job:
            subprocess.run(["scontrol", "requeue", job], check=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.saved_for is not None:
            return
        terminate, warning = self.decide(trainer)
        if terminate:
            self._save(trainer, signal.SIGTERM)
            self._scontrol_requeue(trainer)
            raise SIGTERMException(self.exit_code)
        if warning is not None and self.at_step_boundary(trainer, batch_idx):
            self._save(trainer, warning)

    def restore_handlers(self) -> dict:
        """Put back the handlers found at fit start; -> them."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return previous

    def teardown(self, trainer, pl_module, stage) -> None:
        # the last hook of a fit that ended normally: nothing of ours stays installed
        self.restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        # a failed or SIGTERM-stopped fit gets no teardown hook
        self.restore_handlers()

    def on_fit_end(self, trainer, pl_module) -> None:
        previous = self._previous
        signum, self.saved_for = self.saved_for, None
        if signum not in self.REQUEUED:  # nothing saved, a Ctrl-C, or SIGTERM (requeued)
            return
        owner = previous.get(signum)
        if callable(owner):  # e.g. submitit: it requeues and counts the timeout
            owner(signum, None)
            return
        self._scontrol_requeue(trainer)


class LoadingSanityCheck(L.Callback):
    """The loading sanity check of a fine-tuning run (`training.from_pretrained`; see
    checkpoints.sanity_check_perplexity) at fit set-up, before the strategy wraps the module:
    on global rank 0 alone, on the training device in the run's precision, over the first
    `rows` rows of `batches`. The perplexity is then broadcast, so that every rank holds the
    verdict (`perplexity`); `device` says where it was computed (None on the other ranks)."""

    def __init__(self, batches, threshold: float | None, what: str, rows: int = SANITY_ROWS):
        self.batches, self.threshold, self.what, self.rows = batches, threshold, what, rows
        self.perplexity: float | None = None
        self.device: torch.device | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        if stage != "fit":
            return
        verdict = None  # (perplexity, the UserError's message)
        if trainer.is_global_zero:
            self.device = trainer.strategy.root_device
            pl_module.to(self.device)  # where the strategy moves it next anyway
            try:
                with trainer.precision_plugin.val_step_context():
                    ppl = sanity_check_perplexity(
                        pl_module, self.batches, self.threshold, self.what, self.rows
                    )
                verdict = (ppl, None)
            except UserError as err:  # raised on every rank below, not left waiting
                verdict = (None, str(err))
        self.perplexity, error = trainer.strategy.broadcast(verdict, src=0)
        if error is not None:
            raise UserError(error)


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


class ProgressLog(L.Callback):
    """Training progress as log lines, in place of Lightning's progress bar when stdout is not
    a terminal (slurm logs): the parameter count at the start, then one line every `every`
    optimizer steps and at the last one, e.g.
    "step 400/800  loss 5.1234  lr 2.00e-03  1:02 elapsed, 1:02 left". Global rank 0 only."""

    def __init__(self, every: int):
        self.every = max(1, every)
        self._start: float | None = None
        self._first_step = 0
        self._last_logged = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            count = sum(p.numel() for p in pl_module.parameters())
            log.info("model: %.2f M parameters", count / 1e6)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start, self._first_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        last = total > 0 and step >= total
        if step == self._last_logged or not trainer.is_global_zero:
            return
        if step % self.every and not last:
            return
        self._last_logged = step
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        parts = [f"step {step}/{total}" if total > 0 else f"step {step}"]
        loss = trainer.callback_metrics.get("trainer/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        timing = f"{_clock(elapsed)} elapsed"
        done = step - self._first_step
        if total > 0 and done > 0 and not last:
            timing += f", {_clock(elapsed / done * (total - step))} left"
        log.info("  ".join([*parts, timing]))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
