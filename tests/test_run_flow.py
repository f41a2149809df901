"""The order of a run (main.run): every check that can fail on user input before the first
write, a failed run never destroying a previous one, resumes that refuse changed keys the
steps already trained depend on or have nothing left to do, the block size each objective
fixes, and unknown keys on the command line in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import types

import pytest
import torch

import command_line
import main
import settings
from conftest import compose_cfg, run_inprocess
from sampling import SampleOutput, SamplerConfig
from sampling import generate as generation
from utils import UserError


def snapshot(directory) -> dict[str, bytes]:
    """{path: contents} of every file under `directory`."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


# ----------------------------------------------------------------------------------------------
# sample_eval: prompts checked before any write; samples put in place only by a completed run
# ----------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_prompt_longer_than_the_window_is_refused_before_anything_is_written(
    smoke_checkpoint, tmp_path
):
    """A prompt file whose second line leaves no room for a block in the 32-token window:
    one line naming sampling.prefix_file and the line, and the previous run's samples,
    summary and resolved config untouched."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("samples.jsonl", "sample_eval.json", "config_resolved.yaml"):
        (run_dir / name).write_text(f"the previous run's {name}\n")
    before = snapshot(run_dir)
    prompts = tmp_path / "long.txt"
    prompts.write_text("KING HENRY\n\n" + "word " * 40 + "\n")
    with pytest.raises(UserError) as err:
        run_inprocess(
            run_dir,
            "mode=sample_eval",
            f"eval.checkpoint_path={smoke_checkpoint}",
            f"sampling.prefix_file={prompts}",
        )
    line = str(err.value)
    assert line.startswith(f"sampling.prefix_file={prompts}: line 3: a prompt of "), line
    assert "plus one block of 4 exceeds the model's window of 32 tokens" in line
    assert snapshot(run_dir) == before


class Tokens:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def failing_sampler(fail_at_call: int | None):
    """A sampler of 4-token rows that raises at call `fail_at_call` (counting from 0)."""
    calls = []

    def sample_fn(batch_size, cfg, generator, device, prompt, valid, progress):
        calls.append(batch_size)
        if len(calls) - 1 == fail_at_call:
            raise RuntimeError("out of memory")
        tokens = torch.full((batch_size, 4), len(calls))
        lengths = torch.full((batch_size,), 4)
        pad = torch.zeros(batch_size, dtype=torch.long)
        return SampleOutput(tokens, lengths, lengths, lengths, ["length"] * batch_size, pad)

    return sample_fn


@pytest.mark.parametrize("append", [False, True])
def test_a_failed_sampling_run_leaves_the_previous_samples_as_they_were(tmp_path, append):
    """A run that fails in its second batch leaves samples.jsonl byte for byte (no truncation,
    no half run appended, no partial file); a run that completes replaces it, or in a
    sampling.logdir (append) adds its lines after the previous ones."""
    vocab = types.SimpleNamespace(bos_id=0, mask_id=9, eos_id=0, tokenizer=Tokens())
    cfg = SamplerConfig(length=4, block_size=4, num_steps=1, context=8, bos_id=0, mask_id=9,
                        eos_id=0, reject_low_entropy=False)  # fmt: skip
    job = generation.GenerationJob(2, 3, 0, str(tmp_path), show_progress=False, append=append)
    previous = '{"index": 0, "seed": 7}\n'
    (tmp_path / "samples.jsonl").write_text(previous)
    with pytest.raises(RuntimeError, match="out of memory"):
        generation.generate(failing_sampler(1), cfg, job, vocab, None, "cpu")
    assert os.listdir(tmp_path) == ["samples.jsonl"]
    assert (tmp_path / "samples.jsonl").read_text() == previous
    records = generation.generate(failing_sampler(None), cfg, job, vocab, None, "cpu")
    lines = (tmp_path / "samples.jsonl").read_text().splitlines(keepends=True)
    assert lines == [previous] * append + [json.dumps(r) + "\n" for r in records]
    assert len(records) == 6 and os.listdir(tmp_path) == ["samples.jsonl"]


# ----------------------------------------------------------------------------------------------
# Nothing written before every check has passed; the error line in the run's log
# ----------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_refused_checkpoint_leaves_no_resolved_config(smoke_checkpoint, tmp_path):
    """The family check runs when the module is built, after the settings: the resolved config
    is still unwritten when it refuses."""
    with pytest.raises(UserError, match="evaluate it with algo=bd3lm block_size=4"):
        run_inprocess(
            tmp_path, "mode=ppl_eval", "algo=ar", f"eval.checkpoint_path={smoke_checkpoint}"
        )
    assert not (tmp_path / "config_resolved.yaml").exists()


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------
def smoke_config(**changes) -> dict:
    """The smoke experiment's resolved config as a plain dict, with dotted `changes`."""
    from omegaconf import OmegaConf

    cfg = compose_cfg("checkpointing.save_dir=/tmp/run")
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return OmegaConf.to_container(cfg, resolve=True)


def test_resume_takes_keys_that_act_from_the_resumed_step_and_refuses_the_others():
    stored = smoke_config()
    free = {"trainer__max_steps": 8, "loader__batch_size": 4, "trainer__log_every_n_steps": 2,
            "checkpointing__save_dir": "/tmp/elsewhere", "eval__mc_samples": 3,
            "model__attn_backend": "flex", "data__cache_dir": "/tmp/cache"}  # fmt: skip
    settings.check_resume_config(stored, smoke_config(**free), "where")
    fixed = {"optim__lr": 0.002, "seed": 3, "lr_scheduler__num_warmup_steps": 5,
             "loader__global_batch_size": 16, "model__dropout": 0.1}  # fmt: skip
    with pytest.raises(UserError) as err:
        settings.check_resume_config(stored, smoke_config(**fixed, **free), "where")
    assert str(err.value).startswith(
        "where: the run changes keys that cannot change on resume: seed 1 -> 3, "
        "loader.global_batch_size 8 -> 16, optim.lr 0.001 -> 0.002, "
        "model.dropout 0.0 -> 0.1, lr_scheduler.num_warmup_steps 2 -> 5; set them back"
    )
    ar = {"algo": stored["algo"] | {"name": "ar", "parameterization": "ar", "cross_attn": False}}
    before_k_was_recorded = stored | ar | {"block_size": 32}  # AR then recorded block_size=L
    settings.check_resume_config(before_k_was_recorded, smoke_config(block_size=1) | ar, "where")
    cosine = {"lr_scheduler": {"name": "cosine_decay_warmup", "warmup_t": None}}
    with pytest.raises(UserError, match=r"changes keys .*: trainer.max_steps 4 -> 8;"):
        stored_cosine, run_cosine = stored | cosine, smoke_config(trainer__max_steps=8) | cosine
        settings.check_resume_config(stored_cosine, run_cosine, "where")


@pytest.fixture
def trained_copy(smoke_checkpoint, tmp_path):
    """A copy of the 4-step smoke run's directory."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_checkpoint.parent.parent, run_dir)
    return run_dir


@pytest.mark.e2e
def test_resume_with_a_changed_learning_rate_is_refused_and_writes_nothing(trained_copy):
    before = snapshot(trained_copy)
    with pytest.raises(UserError) as err:
        run_inprocess(trained_copy, "algo=bd3lm", "optim.lr=2e-3", "trainer.max_steps=6")
    last = trained_copy / "checkpoints" / "last.ckpt"
    assert str(err.value).startswith(f"checkpointing.resume_ckpt_path={last}: the run changes")
    assert "optim.lr 0.001 -> 0.002;" in str(err.value) and "max_steps" not in str(err.value)
    assert snapshot(trained_copy) == before


@pytest.mark.e2e
def test_rerunning_a_finished_run_says_nothing_is_left_and_writes_nothing(trained_copy, caplog):
    before = snapshot(trained_copy)
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        run_inprocess(trained_copy, "algo=bd3lm")
    assert "resumed at step 4 from " in caplog.text
    assert "trainer.max_steps=4 is reached, nothing left to do" in caplog.text
    assert snapshot(trained_copy) == before


# ----------------------------------------------------------------------------------------------
# The block size an objective fixes (AR: 1; MDLM, SEDD: the context) is the one recorded
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo,K", [("mdlm", 32), ("sedd", 32), ("ar", 1), ("bd3lm", 4)])
def test_the_block_size_is_the_objectives_own(algo, K, caplog):
    """experiment=smoke sets block_size=4 (BD3-LM's K): MDLM and SEDD take K = L = 32, AR
    K = 1, with a log line; validate leaves the K used in the config."""
    cfg = compose_cfg(f"algo={algo}")
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        settings.validate(cfg)
    assert cfg.block_size == K
    assert (f"block_size 4 of the config -> {K}: algo={algo}" in caplog.text) == (K != 4)


def test_a_typed_block_size_another_objective_fixes_is_refused():
    cfg = compose_cfg("algo=mdlm", "block_size=4")
    with pytest.raises(UserError) as err:
        settings.validate(cfg, command_line={"block_size"})
    assert str(err.value) == (
        "block_size=4: algo=mdlm denoises its whole context as one block "
        "(K = model.length = 32); leave block_size out or set it to 32"
    )


# ----------------------------------------------------------------------------------------------
# Keys on the command line
# ----------------------------------------------------------------------------------------------
def test_unknown_keys_on_the_command_line_are_one_line_with_a_hint():
    with pytest.raises(UserError) as err:
        main.compose(["experiment=smoke", "trainer.max_step=4"], "/tmp/bd3lms-unused")
    assert str(err.value).startswith(
        "trainer.max_step is not a known key (did you mean trainer.max_steps? valid in trainer: "
    )
    with pytest.raises(UserError, match=r"^max_steps is not a known key \(did you mean trainer"):
        command_line.check_command_line(["max_steps=4"])
    sweep = ["-m", "lr_scheduler=constant_warmup,cosine_decay_warmup"]
    with pytest.raises(UserError, match="num_warmup_steps is not a known key with lr_scheduler=c"):
        command_line.check_command_line([*sweep, "lr_scheduler.num_warmup_steps=3"])
    with pytest.raises(UserError, match=r"^wandb.name: wandb is null here; add the key with \+"):
        command_line.check_command_line(["experiment=smoke", "wandb.name=x"])
    # additions, deletions, Hydra's keys, sweeps: Hydra's and the schema's
    command_line.check_command_line(
        ["-m", "experiment=smoke", "algo=ar,mdlm", "+trainer.max_step=4", "~trainer.max_epochs",
         "hydra.run.dir=x", "trainer.max_steps=3,4", "+wandb.name=x"]
    )  # fmt: skip
