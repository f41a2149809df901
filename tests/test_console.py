"""The console: progress as log lines when stdout is not a terminal, Lightning's tips and known
deprecation warnings silenced at the entry point, the resolved config printed only with
verbose=true (always saved, also into a sampling.logdir), samples shown without the BOS."""

from __future__ import annotations

import logging
import types
import warnings

import pytest

from conftest import run_inprocess, run_main
from training_callbacks import ProgressLog
from utils import quiet_console


def fake_trainer(step: int, max_steps: int = 10) -> types.SimpleNamespace:
    optimizer = types.SimpleNamespace(param_groups=[{"lr": 2e-3}])
    return types.SimpleNamespace(
        global_step=step,
        max_steps=max_steps,
        is_global_zero=True,
        callback_metrics={"trainer/loss": 5.5},
        optimizers=[optimizer],
    )


def test_progress_lines_every_n_steps_and_at_the_end(caplog):
    callback = ProgressLog(every=4)
    caplog.set_level(logging.INFO, logger="bd3lms")
    for step in [0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]:  # micro-batches repeat a step
        trainer = fake_trainer(step)
        callback.on_train_batch_start(trainer, None, None, 0)
        callback.on_train_batch_end(trainer, None, None, None, 0)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("  ")[0] for line in lines] == [
        "step 0/10", "step 4/10", "step 8/10", "step 10/10",
    ]  # fmt: skip
    assert "loss 5.5000  lr 2.00e-03" in lines[1] and "left" in lines[1]
    assert "left" not in lines[-1]


def test_quiet_console_drops_tips_and_the_leafspec_warning():
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    before = list(rank_zero.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            quiet_console()
            tip = logging.LogRecord("x", logging.INFO, "", 0, "💡 Tip: try litlogger", (), None)
            info = logging.LogRecord("x", logging.INFO, "", 0, "GPU available: False", (), None)
            assert not rank_zero.filter(tip) and rank_zero.filter(info)
            for line in (  # a resume: main.py logs "resumed at step N from PATH"
                "Restoring states from the checkpoint path at /run/checkpoints/last.ckpt",
                "Restored all states from the checkpoint at /run/checkpoints/last.ckpt",
            ):
                record = logging.LogRecord("x", logging.INFO, "", 0, line, (), None)
                assert not rank_zero.filter(record)
            warnings.warn(
                "`isinstance(treespec, LeafSpec)` is deprecated, use ...",
                FutureWarning,
                stacklevel=1,
            )
            warnings.warn("another warning", FutureWarning, stacklevel=1)
        finally:
            rank_zero.filters[:] = before
    assert [str(w.message) for w in caught] == ["another warning"]


@pytest.mark.e2e
def test_cli_console_is_quiet_and_verbose_prints_the_config(tmp_path, data_cache, capsys, caplog):
    """A smoke train through the CLI with stdout a pipe (the entry point's silencing), then
    sample_eval with verbose=true in process (its prints and log lines)."""
    import logging

    run = tmp_path / "run"
    train = run_main(run, "mode=train")
    console = train.stdout + train.stderr
    assert "resolved config" not in console and (run / "config_resolved.yaml").is_file()
    assert "💡" not in console and "LeafSpec" not in console and "Params" not in console
    assert "step 4/4  loss" in console and "model: " in console
    logdir = tmp_path / "logdir"
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        run_inprocess(run, "mode=sample_eval", "verbose=true", f"sampling.logdir={logdir}")
    printed = capsys.readouterr().out
    console = printed + caplog.text
    assert "resolved config:\nmode: sample_eval" in console
    assert (logdir / "config_resolved.yaml").is_file() and (logdir / "samples.jsonl").is_file()
    assert "tokens/s" in console and printed.count("--- sample ") == 2
    assert "<|endoftext|>" not in printed.split("--- sample ", 1)[1]
