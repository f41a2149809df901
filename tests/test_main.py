"""End-to-end runs of every mode through main.run (in process) on the tiny `experiment=smoke`
config, the bad-input contract (one line, nothing written; exit code 2 from the CLI), and the
reference README's command lines."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import pytest
import torch
from omegaconf import OmegaConf

import main
from conftest import bad_run, run_inprocess, run_main
from utils import UserError

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def trained_bd3lm(smoke_checkpoint):
    return smoke_checkpoint.parent.parent


def test_train_writes_step_checkpoints_and_last(trained_bd3lm):
    names = sorted(os.listdir(trained_bd3lm / "checkpoints"))
    assert {"last.ckpt", "step_00000002.ckpt", "step_00000004.ckpt", "best.ckpt"} <= set(names)
    ckpt = torch.load(trained_bd3lm / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["config"]["block_size"] == 4 and ckpt["config"]["model"]["length"] == 32
    assert ckpt["ema"]["num_updates"] == 4
    assert "sampling_eps_min" in ckpt["state_dict"]


def test_rerun_resumes_from_last_checkpoint(trained_bd3lm, data_cache, tmp_path, caplog):
    """... without Lightning's warning that the checkpoint directory it resumes from is not
    empty."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(trained_bd3lm, run_dir)
    with caplog.at_level(logging.INFO, logger="bd3lms"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run_inprocess(run_dir, "algo=bd3lm", "trainer.max_steps=6")
    assert "resumed at step 4" in caplog.text
    assert not [x for x in w if "exists and is not empty" in str(x.message)]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["ema"]["num_updates"] == 6


def test_ppl_eval_writes_json(trained_bd3lm, data_cache, tmp_path):
    ckpt = trained_bd3lm / "checkpoints" / "last.ckpt"
    run_inprocess(tmp_path, "mode=ppl_eval", f"eval.checkpoint_path={ckpt}")
    result = json.loads((tmp_path / "ppl_eval.json").read_text())
    assert result["num_tokens"] == 2 * 8 * 31  # 2 batches x 8 sequences, BOS excluded
    assert result["ppl"] == pytest.approx(torch.tensor(result["nll"]).exp().item(), rel=1e-6)
    assert result["bpd"] == pytest.approx(result["nll"] / 0.6931471805599453, rel=1e-6)
    assert 1 < result["ppl"] < 4097 * 4  # a bound on an almost untrained model


def test_sample_eval_writes_samples(trained_bd3lm, data_cache, tmp_path, judge_dir):
    ckpt = trained_bd3lm / "checkpoints" / "last.ckpt"
    run_inprocess(
        tmp_path,
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        "loader.eval_batch_size=3",
        "model.length=64",  # twice the trained window of 32
        "sampling.kv_cache=true",
        f"eval.gen_ppl_eval_model_name_or_path={judge_dir}",
    )
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert len(samples) == 3
    for s in samples:
        assert len(s["token_ids"]) == s["length"] == 64 and s["token_ids"][0] == 0  # BOS
        assert 4096 not in s["token_ids"], "no mask token survives sampling"
        assert s["nfe_denoise"] == 63  # first-hitting: one token per call, BOS given
        assert s["nfe_total"] == 63  # each block is committed inside the next one's first call
        assert s["stop_reason"] == "length" and s["gen_ppl"] > 1 and s["entropy"] > 0
        assert isinstance(s["text"], str)
    summary = json.loads((tmp_path / "sample_eval.json").read_text())
    assert summary["num_samples"] == 3 and summary["nfe_denoise_mean"] == 63
    assert summary["length_median"] == summary["length_max"] == 64
    assert summary["gen_ppl_token_weighted"] > 1 and summary["evaluator"] == str(judge_dir)
    assert (tmp_path / "lengths.png").stat().st_size > 1000


def test_sample_eval_logdir_accumulates_runs(trained_bd3lm, data_cache, tmp_path):
    ckpt = trained_bd3lm / "checkpoints" / "last.ckpt"
    logdir = tmp_path / "logs"
    for seed in (1, 2):
        run_inprocess(
            tmp_path / f"run{seed}",
            "mode=sample_eval",
            f"eval.checkpoint_path={ckpt}",
            "loader.eval_batch_size=2",
            f"seed={seed}",
            "sampling.prefix=KING HENRY",
            f"sampling.logdir={logdir}",
        )
    samples = [json.loads(x) for x in (logdir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["seed"] for s in samples} == {1, 2}
    assert all(s["prompt"] == "KING HENRY" for s in samples)
    assert json.loads((logdir / "sample_eval.json").read_text())["num_samples"] == 4


def test_sample_eval_rerun_in_a_run_directory_replaces_its_samples(
    trained_bd3lm, data_cache, tmp_path
):
    ckpt = trained_bd3lm / "checkpoints" / "last.ckpt"
    (tmp_path / "samples.rank3.jsonl").write_text("{}\n")  # left by a 4-process run
    for _ in range(2):
        run_inprocess(
            tmp_path,
            "mode=sample_eval",
            f"eval.checkpoint_path={ckpt}",
            "loader.eval_batch_size=2",
        )
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "samples.rank3.jsonl").exists()
    assert json.loads((tmp_path / "sample_eval.json").read_text())["num_samples"] == 2


@pytest.mark.parametrize("algo", ["mdlm", "ar", "sedd"])
def test_baselines_train_and_sample(algo, data_cache, tmp_path):
    """The smoke experiment's block_size=4 is BD3-LM's: each baseline runs with its own K
    (MDLM and SEDD: the 32-token context, AR: 1), recorded in the config and checkpoint."""
    K = 1 if algo == "ar" else 32
    run_inprocess(tmp_path, f"algo={algo}", "trainer.max_steps=2")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["config"]["block_size"] == K
    out = tmp_path / "samples"
    # MDLM: a 32-token window then a 16-token stride; AR: a sliding window; SEDD: its context
    length = 32 if algo == "sedd" else 48
    run_inprocess(
        out,
        "mode=sample_eval",
        f"algo={algo}",
        f"eval.checkpoint_path={ckpt}",
        "loader.eval_batch_size=2",
        *(["sampling.first_hitting=false"] if algo == "mdlm" else []),  # AR, SEDD: refused
        f"model.length={length}",
    )
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(len(s["token_ids"]) == length for s in samples)
    assert all(4096 not in s["token_ids"] for s in samples)
    for run_dir in (tmp_path, out):  # K = the trained window when sampling 48 tokens
        assert OmegaConf.load(run_dir / "config_resolved.yaml").block_size == K


def test_fine_tune_from_mdlm_style_pretrain(trained_bd3lm, data_cache, tmp_path):
    """Stage 2 of the recipe: a K = L pre-train seeds a K = 4 run (EMA weights, EMA restarted)."""
    pretrain = tmp_path / "pretrain"
    run_inprocess(pretrain, "block_size=32", "trainer.max_steps=2")
    ckpt = pretrain / "checkpoints" / "last.ckpt"
    run_inprocess(tmp_path / "ft", "block_size=4", f"training.from_pretrained={ckpt}")
    last = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["ema"]["num_updates"] == 4  # restarted, not inherited from the pre-train


def test_the_cli_exits_with_code_2_and_one_line(tmp_path, data_cache, monkeypatch):
    """The subprocesses of the contract: main.py turns a UserError into exit code 2 and one
    `error: ...` line on stderr, also logged to the run's main.log, and writes no output. An
    unknown key is refused before torch is imported (no run directory yet)."""
    proc = run_main(tmp_path / "bad", "block_size=5", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: block_size=5"), proc.stderr
    assert set(os.listdir(tmp_path / "bad")) == {".hydra", "main.log"}
    assert lines[0] in (tmp_path / "bad" / "main.log").read_text()
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # every import, on stderr
    proc = run_main(tmp_path / "typo", "trainer.max_step=4", check=False)
    imports = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and line not in imports]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: trainer.max_step is not a known key (did you mean trainer")
    assert imports and not [line for line in imports if line.endswith("| torch")]
    assert not (tmp_path / "typo").exists()


def test_unreadable_checkpoint_is_refused(tmp_path, data_cache):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    line = bad_run(tmp_path, "mode=ppl_eval", f"eval.checkpoint_path={bogus}")
    assert "not a readable checkpoint" in line


# The reference README's command lines at block size 4; training uses sdpa instead of flex (which
# cannot train on CPU, tested above) so that the run gets as far as the pre-trained checkpoint.
REFERENCE_COMMANDS = {
    "sample": "loader.eval_batch_size=1 model=small algo=bd3lm algo.T=5000 algo.backbone=hf_dit "
    "data=openwebtext-split model.length=2048 block_size=4 wandb=null mode=sample_eval "
    "eval.checkpoint_path=kuleshov-group/bd3lm-owt-block_size4 model.attn_backend=sdpa "
    "sampling.nucleus_p=0.9 sampling.kv_cache=true sampling.logdir=/tmp/sample_logs",
    "ppl": "loader.eval_batch_size=16 model=small algo=bd3lm algo.backbone=hf_dit "
    "data=openwebtext-split data.insert_valid_special=False model.length=1024 "
    "model.attn_backend=flex block_size=4 "
    "eval.checkpoint_path=kuleshov-group/bd3lm-owt-block_size4 wandb=null mode=ppl_eval",
    "train": "loader.global_batch_size=512 loader.eval_global_batch_size=512 loader.batch_size=16 "
    "loader.eval_batch_size=16 model=small algo=bd3lm "
    "algo.clip_search_widths=[0.5,0.6,0.7,0.8,0.9] data=openwebtext-split model.length=1024 "
    "block_size=4 wandb.name=bd3lm-owt-block_size4 "
    "mode=train model.attn_backend=sdpa training.resample=True "
    "training.from_pretrained=kuleshov-group/bd3lm-owt-block_size1024-pretrain +wandb.offline=true",
}


@pytest.mark.parametrize("name", sorted(REFERENCE_COMMANDS))
def test_reference_command_lines_parse_and_fail_in_one_line_offline(
    name, tmp_path, data_cache, monkeypatch
):
    """Without network or checkpoints each README command must get past Hydra and stop with one
    clear line naming what is missing (not a traceback, not a Hydra override error)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(UserError) as err:
        main.run(main.compose(REFERENCE_COMMANDS[name].split(), str(tmp_path)), str(tmp_path))
    message = str(err.value)  # the judge (sample), or the hub checkpoint (ppl, train)
    assert "\n" not in message and message.startswith(("eval.", "training.")), message
    assert set(os.listdir(tmp_path)) <= {"config_resolved.yaml"}
