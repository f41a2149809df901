"""Stopping on a signal (training_callbacks.Preemption): a first Ctrl-C saves last.ckpt at the end
of the optimizer step, a second aborts at once; a signal-stopped fit has a non-zero exit code
(128 + the signal); SIGTERM's save prints no Lightning `weights_only` line. Also the console
and file items of the same issue: checkpoint files follow the umask, eager flex attention on
CPU prints no torch advice to compile. A one-parameter LightningModule on CPU (fast)."""

from __future__ import annotations

import logging
import os
import signal
import stat
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

import training_callbacks
from training_callbacks import AtomicCheckpointIO, Preemption

ACCUMULATE = 2  # micro-batches per optimizer step


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SignalAt(L.Callback):
    """Sends this process `signals[batch_idx]` at the start of that micro-batch."""

    def __init__(self, signals: dict[int, int]):
        self.signals = signals

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx in self.signals:
            os.kill(os.getpid(), self.signals[batch_idx])


def fit(tmp_path, signals: dict[int, int], max_steps: int = 3):
    """Fit Tiny for `max_steps` optimizer steps of ACCUMULATE micro-batches with `signals`
    sent along the way -> (trainer, the Preemption callback)."""
    preemption = Preemption(str(tmp_path / "last.ckpt"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=ACCUMULATE,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=tmp_path,
        callbacks=[SignalAt(signals), preemption],
    )
    data = torch.utils.data.TensorDataset(torch.randn(32, 2))
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=2))
    return trainer, preemption


@pytest.fixture
def requeues(monkeypatch):
    """The `scontrol requeue` commands run, inside a slurm job (SLURM_JOB_ID set)."""
    commands = []
    monkeypatch.setattr(
        training_callbacks.subprocess, "run", lambda cmd, check: commands.append(cmd)
    )
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return commands


def saved_step(tmp_path) -> int:
    return torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"]


@pytest.mark.parametrize(
    "signum,requeued",
    [(signal.SIGINT, []), (signal.SIGUSR1, [["scontrol", "requeue", "4242"]])],
    ids=["ctrl-c", "sigusr1"],
)
def test_a_signal_saves_at_the_step_end_and_exits_non_zero(
    tmp_path, requeues, caplog, signum, requeued
):
    """A first Ctrl-C (or slurm's SIGUSR1) in the first micro-batch of optimizer step 2: the
    save waits for the step's end, training stops there, and the exit code is 128 + signum.
    Ctrl-C requeues nothing and says that a second one aborts; SIGUSR1 still requeues."""
    before = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING, logger="bd3lms"):
        trainer, preemption = fit(tmp_path, {ACCUMULATE: signum})
    assert saved_step(tmp_path) == trainer.global_step == 2
    assert preemption.exit_code == 128 + signum
    assert requeues == requeued
    assert signal.getsignal(signal.SIGINT) == before, "the handlers are restored"
    if signum == signal.SIGINT:
        assert "Ctrl-C again aborts at once" in caplog.text


def test_a_second_ctrl_c_aborts_at_once(tmp_path, requeues):
    """Ctrl-C twice within optimizer step 2: KeyboardInterrupt at the second (Lightning's
    shutdown, exit code 1), before the step ends: nothing saved, no requeue."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path, {ACCUMULATE: signal.SIGINT, ACCUMULATE + 1: signal.SIGINT})
    assert stop.value.code == 1
    assert not (tmp_path / "last.ckpt").exists() and requeues == []
    assert signal.getsignal(signal.SIGINT) == before, "the handlers are restored"


def test_sigterm_exits_143_and_prints_no_weights_only_line(tmp_path, requeues, caplog):
    """SIGTERM saves at the end of its micro-batch (mid-accumulation), requeues, and stops
    with exit code 143 (SIGTERMException is a SystemExit: it was 0, so `train && eval` went
    on); the save passes weights_only itself (Lightning logs a line when it is left unset)."""
    connector = "lightning.pytorch.trainer.connectors.checkpoint_connector"
    with caplog.at_level(logging.INFO, logger=connector), pytest.raises(SIGTERMException) as stop:
        fit(tmp_path, {ACCUMULATE: signal.SIGTERM})
    assert stop.value.code == 143
    assert saved_step(tmp_path) == 1
    assert requeues == [["scontrol", "requeue", "4242"]]
    assert "weights_only" not in caplog.text


def test_ctrl_c_ignored_at_fit_start_stays_ignored(tmp_path):
    """A background job of a non-interactive shell ignores SIGINT: the fit runs to its end."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer, preemption = fit(tmp_path, {1: signal.SIGINT})
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert trainer.global_step == 3 and preemption.exit_code is None
    assert not (tmp_path / "last.ckpt").exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_checkpoint_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "last.ckpt").st_mode) == mode
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_flex_on_cpu_prints_no_advice_to_compile(monkeypatch):
    """Eager flex attention is CPU's only flex path (its NLL matches SDPA's): torch's 10-line
    warning that it is unfused is not shown."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from models.attention import FLEX_EAGER_WARNING, BlockCausalMask, MaskCache, attend

    monkeypatch.setattr(flex, "_WARNINGS_SHOWN", set())  # torch warns once per process
    mask = MaskCache("flex").get(BlockCausalMask(4), 8, 8, torch.device("cpu"))
    q = torch.randn(1, 2, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attend(q, q, q, mask, "flex")
    assert not [w for w in caught if FLEX_EAGER_WARNING in str(w.message)]
