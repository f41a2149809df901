"""checkpointing.save_dir as an fsspec URL (memory:// here, s3:// in production): a requeued run
finds last.ckpt there and resumes, keep_last_k deletes there, and a failed save leaves the
previous last.ckpt whole."""

from __future__ import annotations

import io
import logging

import fsspec
import pytest
import torch

from conftest import run_inprocess
from utils import UserError

ARGS = ["trainer.val_check_interval=100", "checkpointing.keep_last_k=1"]


def load(fs, path: str) -> dict:
    return torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True)


@pytest.mark.e2e
def test_url_save_dir_resumes_and_keeps_last_k(tmp_path, data_cache, caplog):
    fs = fsspec.filesystem("memory")
    url = "memory://bd3lms-test-resume/run"
    save = [f"checkpointing.save_dir={url}", *ARGS]
    try:
        run_inprocess(tmp_path, *save, "trainer.max_steps=2")
        assert load(fs, f"{url}/checkpoints/last.ckpt")["global_step"] == 2
        with caplog.at_level(logging.INFO, logger="bd3lms"):
            run_inprocess(tmp_path, *save, "trainer.max_steps=4")  # the requeued job
        assert "resumed at step 2 from memory://" in caplog.text
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{url}/checkpoints", detail=False))
        assert names == ["last.ckpt", "step_00000004.ckpt"]  # keep_last_k=1 deleted step 2
        assert load(fs, f"{url}/checkpoints/last.ckpt")["global_step"] == 4
        assert not list(tmp_path.glob(".fetch-*")), "the local copy of last.ckpt is removed"
    finally:
        fs.rm("/bd3lms-test-resume", recursive=True)


def test_failed_url_save_keeps_the_previous_checkpoint(monkeypatch):
    from training_callbacks import AtomicCheckpointIO

    fs = fsspec.filesystem("memory")
    path = "memory://bd3lms-test-atomic/checkpoints/last.ckpt"
    checkpoint_io = AtomicCheckpointIO()
    try:
        checkpoint_io.save_checkpoint({"step": 1}, path)

        def crash(obj, f, *args, **kwargs):
            f.write(b"partial")
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", crash)
        with pytest.raises(OSError):
            checkpoint_io.save_checkpoint({"step": 2}, path)
        monkeypatch.undo()
        assert load(fs, path) == {"step": 1}
        assert fs.ls("/bd3lms-test-atomic/checkpoints", detail=False) == [
            "/bd3lms-test-atomic/checkpoints/last.ckpt"
        ]
    finally:
        fs.rm("/bd3lms-test-atomic", recursive=True)


def test_unknown_protocol_is_one_line():
    from utils import local_copy_if_exists

    key = "checkpointing.resume_ckpt_path"
    with pytest.raises(UserError, match=rf"{key}=nope://x/last.ckpt: no fsspec filesystem"):
        local_copy_if_exists("nope://x/last.ckpt", key, ".").__enter__()


def test_file_url_save_dir_is_the_local_directory(tmp_path):
    """Lightning's ModelCheckpoint would make file://DIR a relative directory named `file:`."""
    import builders
    from conftest import compose_cfg
    from training_callbacks import AtomicCheckpointIO
    from utils import local_copy_if_exists

    url = f"file://{tmp_path}/run"
    cfg = compose_cfg(f"checkpointing.save_dir={url}")
    dirs = {c.dirpath for c in builders.build_callbacks(cfg) if hasattr(c, "dirpath")}
    assert dirs == {f"{tmp_path}/run/checkpoints"}
    AtomicCheckpointIO().save_checkpoint({"step": 1}, cfg.checkpointing.resume_ckpt_path)
    key = "checkpointing.resume_ckpt_path"
    with local_copy_if_exists(cfg.checkpointing.resume_ckpt_path, key, str(tmp_path)) as local:
        assert local == f"{tmp_path}/run/checkpoints/last.ckpt"  # read in place, no copy
        assert torch.load(local, weights_only=True) == {"step": 1}


def test_unreadable_url_checkpoint_names_the_url(tmp_path):
    """The resume checkpoint is read from a local copy; errors name what the user gave."""
    import main
    from conftest import tiny_module

    local = tmp_path / "last.ckpt"
    local.write_bytes(b"not a checkpoint")
    url = "memory://bd3lms-test-bad/checkpoints/last.ckpt"
    with pytest.raises(UserError) as err:
        main.check_resume(tiny_module(), str(local), url)
    assert str(err.value).startswith(f"checkpointing.resume_ckpt_path={url} is not a readable")
    assert str(local) not in str(err.value)
