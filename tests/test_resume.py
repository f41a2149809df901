"""Preemption-safe training (e2e): SIGKILL-and-resume is bit-identical, saves are atomic, rolling
checkpoints, SIGUSR1 saves and stops, a resume checkpoint of another shape is refused."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import types

import lightning as L
import pytest
import torch

from conftest import OFFLINE, ROOT, bad_run, run_inprocess
from utils import UserError

pytestmark = pytest.mark.e2e
STEPS = 12
ARGS = ["model.dropout=0.1", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=100"]


def launch(run_dir, cache, *overrides):
    env = {**os.environ, **OFFLINE, "BD3LMS_CACHE": cache, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "experiment=smoke"]
    cmd += [f"hydra.run.dir={run_dir}", *ARGS, *overrides]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"], ckpt["ema"]["shadow"]


def test_sigkill_then_resume_is_bit_identical(tmp_path, data_cache, caplog):
    """A training process killed with SIGKILL (no handler can run) resumes from its last
    atomic checkpoint and ends bit-identical to an uninterrupted run."""
    straight = tmp_path / "straight"
    run_inprocess(straight, *ARGS)
    killed = tmp_path / "killed"
    proc = launch(killed, data_cache)
    first = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        run_inprocess(killed, *ARGS)  # the requeued job
    out = caplog.text
    assert "resumed at step" in out
    resumed_at = int(out.split("resumed at step ")[1].split()[0])
    assert 2 <= resumed_at < STEPS, "the kill must land before the end for this test to bite"
    step_a, weights_a, ema_a = final_state(straight)
    step_b, weights_b, ema_b = final_state(killed)
    assert step_a == step_b == STEPS
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name
    for name, tensor in ema_a.items():
        assert torch.equal(tensor, ema_b[name]), name


def test_keep_last_k_and_sigusr1(tmp_path, data_cache):
    """keep_last_k keeps the k newest step checkpoints; SIGUSR1 (our sbatch template's warning
    signal) saves last.ckpt at the end of that step and stops."""
    run_dir = tmp_path / "run"
    run_inprocess(run_dir, *ARGS, "checkpointing.keep_last_k=2")
    steps = sorted(f for f in os.listdir(run_dir / "checkpoints") if f.startswith("step_"))
    assert steps == [f"step_{STEPS - 2:08d}.ckpt", f"step_{STEPS:08d}.ckpt"]
    preempted = tmp_path / "preempted"
    callback = [f"+callbacks.preempt._target_={__name__}.SendSignalAt"]
    callback += ["+callbacks.preempt.batch=3", f"+callbacks.preempt.signum={signal.SIGUSR1}"]
    callback += ["+callbacks.preempt.once_below_step=10"]
    with pytest.raises(SystemExit) as stop:  # a signal-stopped run exits 128 + signum
        run_inprocess(preempted, *ARGS, "trainer.max_steps=100000", *callback)
    assert stop.value.code == 128 + signal.SIGUSR1
    step, _, _ = final_state(preempted)
    assert step == 4  # micro-batch 3 is optimizer step 4 (no accumulation); then it stopped


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from training_callbacks import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_resume_from_another_model_shape_is_refused(tmp_path, data_cache):
    run_dir = tmp_path / "bad"
    run_inprocess(run_dir, "trainer.max_steps=2")
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match="checkpointing.resume_ckpt_path"):
        run_inprocess(run_dir, "model.hidden_size=48")
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_unwritable_save_dir(tmp_path, data_cache):
    line = bad_run(tmp_path, "checkpointing.save_dir=/dev/null/run")
    assert "checkpointing.save_dir" in line


class SendSignalAt(L.Callback):
    """Test callback: sends `signum` to this process at the start of micro-batch `batch` of the
    first run only (`once_below_step`: not once training has passed that step)."""

    def __init__(self, batch: int, signum: int, once_below_step: int = 3):
        self.batch, self.signum, self.below = batch, signum, once_below_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch and trainer.global_step < self.below:
            os.kill(os.getpid(), self.signum)


ACCUMULATE = ["loader.global_batch_size=8", "loader.batch_size=4", "model.dropout=0.1"]
ACCUMULATE += ["trainer.max_steps=6", "trainer.val_check_interval=100"]


def test_usr2_mid_accumulation_saves_after_the_step_and_resumes_bit_identically(
    tmp_path, data_cache
):
    """submitit's warning signal (SIGUSR2) arrives during micro-batch 1 of an accumulation of 2
    (batch_idx 2, the first half of optimizer step 2): the save waits for the step to end, the
    handler submitit installed before training is then called (it requeues and counts), and a
    resume from that checkpoint ends bit-identical to an uninterrupted run."""
    run_inprocess(tmp_path / "straight", *ACCUMULATE)
    owner_calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: owner_calls.append(signum))
    try:
        callback = [f"+callbacks.preempt._target_={__name__}.SendSignalAt"]
        callback += ["+callbacks.preempt.batch=2", f"+callbacks.preempt.signum={signal.SIGUSR2}"]
        with pytest.raises(SystemExit) as stop:
            run_inprocess(tmp_path / "preempted", *ACCUMULATE, *callback)
        assert stop.value.code == 128 + signal.SIGUSR2
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert owner_calls == [signal.SIGUSR2]
    saved = torch.load(tmp_path / "preempted" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2, "saved at the end of the interrupted optimizer step"
    run_inprocess(tmp_path / "preempted", *ACCUMULATE)  # the requeued job: resume to the end
    step_a, weights_a, ema_a = final_state(tmp_path / "straight")
    step_b, weights_b, ema_b = final_state(tmp_path / "preempted")
    assert step_a == step_b == 6
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name
    for name, tensor in ema_a.items():
        assert torch.equal(tensor, ema_b[name]), name


def test_requeue_owner(monkeypatch):
    """After the save, a signal with a Python owner (submitit) is handed to it; without one
    (a plain sbatch job) rank 0 requeues the slurm job itself."""
    from training_callbacks import Preemption

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: commands.append(cmd))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    trainer = types.SimpleNamespace(is_global_zero=True)
    callback = Preemption("unused")
    callback._previous, callback.saved_for = {signal.SIGUSR1: signal.SIG_DFL}, signal.SIGUSR1
    callback.on_fit_end(trainer, None)
    assert commands == [["scontrol", "requeue", "4242"]]
    owned = []
    callback._previous = {signal.SIGUSR2: lambda s, f: owned.append(s)}
    callback.saved_for = signal.SIGUSR2
    callback.on_fit_end(trainer, None)
    assert owned == [signal.SIGUSR2] and len(commands) == 1
    callback.on_fit_end(trainer, None)  # nothing saved: nothing to hand over
    assert owned == [signal.SIGUSR2] and len(commands) == 1


def test_sigterm_saves_at_once_and_requeues_under_slurm(tmp_path, data_cache, monkeypatch):
    """SIGTERM (slurm's preemption and end-of-time signal): Lightning ends the fit after the
    current micro-batch, so the save happens there and rank 0 requeues at once. SLURM_JOB_ID
    is set, so the trainer also takes Lightning's SLURM environment (without its requeue)."""
    import training_callbacks

    commands, real_run = [], subprocess.run

    def run(cmd, **kwargs):  # scontrol is recorded; other commands (git for provenance) run
        return commands.append(cmd) if cmd[0] == "scontrol" else real_run(cmd, **kwargs)

    monkeypatch.setattr(training_callbacks.subprocess, "run", run)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    previous = signal.getsignal(signal.SIGTERM)
    callback = [f"+callbacks.preempt._target_={__name__}.SendSignalAt"]
    callback += ["+callbacks.preempt.batch=2", f"+callbacks.preempt.signum={signal.SIGTERM}"]
    try:
        run_inprocess(tmp_path, *ACCUMULATE, *callback)
    except BaseException as err:  # Lightning raises SIGTERMException after the save
        assert type(err).__name__ == "SIGTERMException", err
    assert signal.getsignal(signal.SIGTERM) == previous, "the handlers are restored"
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1  # after micro-batch 2, the first half of step 2
    assert commands == [["scontrol", "requeue", "4242"]]
