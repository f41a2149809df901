"""The paper-run configs: every configs/experiment/*.yaml composes, passes validation and splits
its batch for the GPU count its slurm launchers ask for; the batch arithmetic of the paper's
runs; the FSDP strategy and the submitit launcher configs parse (the plugin is not needed)."""

from __future__ import annotations

import glob
import os
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import settings
from conftest import ROOT

CONFIGS = os.path.join(ROOT, "configs")
EXPERIMENTS = sorted(
    os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, "experiment", "*.yaml"))
)
PAPER_RUNS = [n for n in EXPERIMENTS if n not in ("demo", "smoke", "hf_causal_smoke")]
LAUNCHER_DIRS = ("train", "eval", "gen_ppl", "var_len", "zero_shot")
TEMPLATE_GPUS = 8  # scripts/slurm/job.sbatch: --gres=gpu:8
GPU_HW = settings.Hardware("gpu", 8, 1, "bf16-mixed")


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(CONFIGS, version_base=None):
        return compose(
            "config",
            overrides=[f"experiment={name}", "checkpointing.save_dir=/tmp/x", *overrides],
        )


def needs_missing_algo(name: str) -> str | None:
    """The algo an experiment selects when its config file does not exist (yet)."""
    with open(os.path.join(CONFIGS, "experiment", f"{name}.yaml")) as f:
        match = re.search(r"override /algo: (\w+)", f.read())
    if match and not os.path.isfile(os.path.join(CONFIGS, "algo", f"{match[1]}.yaml")):
        return match[1]
    return None


def launcher_gpus(folders=LAUNCHER_DIRS) -> dict[str, set[int]]:
    """experiment name -> the GPU counts of the sbatch lines (in scripts/FOLDER/*.sh) that
    launch it."""
    found: dict[str, set[int]] = {}
    for folder in folders:
        for path in glob.glob(os.path.join(ROOT, "scripts", folder, "*.sh")):
            with open(path) as f:
                for line in f:
                    if line.lstrip().startswith("#"):
                        continue
                    gres = re.search(r"--gres=gpu:(\d+)", line)
                    for name in re.findall(r"experiment=([\w-]+)", line):
                        found.setdefault(name, set()).add(int(gres[1]) if gres else TEMPLATE_GPUS)
    return found


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    if missing := needs_missing_algo(name):
        pytest.skip(f"configs/algo/{missing}.yaml does not exist yet")
    with open(os.path.join(CONFIGS, "experiment", f"{name}.yaml")) as f:
        assert f.readline().strip() == "# @package _global_"
    cfg = compose_experiment(name)
    for gpus in launcher_gpus().get(name, {TEMPLATE_GPUS}):
        settings.validate(cfg, settings.Hardware("gpu", gpus, 1, "bf16-mixed"))
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_every_paper_run_has_a_launcher():
    assert set(PAPER_RUNS) <= set(launcher_gpus())


# (data, L, per-GPU batch, GPUs, accumulation) of the paper's runs (reference launchers)
TRAINING = {
    "lm1b_ar": ("lm1b", 128, 128, 4, 1),
    "lm1b_mdlm": ("lm1b", 128, 128, 4, 1),
    "lm1b_sedd": ("lm1b", 128, 128, 4, 1),
    "lm1b_bd3lm_pretrain": ("lm1b", 128, 64, 4, 2),
    "lm1b_bd3lm_finetune": ("lm1b", 128, 64, 4, 2),
    "owt_ar": ("openwebtext-train", 1024, 16, 8, 4),
    "owt_mdlm": ("openwebtext-train", 1024, 16, 8, 4),
    "owt_sedd": ("openwebtext-train", 1024, 16, 8, 4),
    "owt_bd3lm_pretrain": ("openwebtext-train", 1024, 16, 8, 4),
    "owt_bd3lm_finetune": ("openwebtext-train", 1024, 16, 8, 4),
}


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_training_runs_follow_the_paper(name):
    if missing := needs_missing_algo(name):
        pytest.skip(f"configs/algo/{missing}.yaml does not exist yet")
    data, length, batch, gpus, accumulate = TRAINING[name]
    cfg = compose_experiment(name)
    assert cfg.mode == "train" and cfg.model.name == "small" and cfg.data.train == data
    assert cfg.model.length == length and cfg.loader.global_batch_size == 512
    assert launcher_gpus(["train"])[name] == {gpus}
    if "keep_last_k" in cfg.checkpointing:  # a key config.yaml gained; absent in older trees
        assert cfg.checkpointing.keep_last_k == 5
    plan = settings.plan_batches(cfg.loader, gpus, cfg.trainer.accumulate_grad_batches)
    assert (plan.batch_size, plan.accumulate) == (batch, accumulate)
    if name.startswith("owt_"):
        assert not cfg.data.insert_train_special and not cfg.data.insert_valid_special
        assert not cfg.data.insert_valid_eos
    if name.endswith("_finetune"):
        assert list(cfg.algo.clip_search_widths) == [0.5, 0.6, 0.7, 0.8, 0.9]
        assert cfg.training.resample and cfg.training.from_pretrained
        assert cfg.model.attn_backend == "flex" and cfg.block_size == 16
    if name.endswith("_pretrain"):
        assert cfg.block_size == cfg.model.length and cfg.trainer.max_steps == 850_000


def test_sampling_runs_follow_the_paper():
    expected = {  # (algo.T, nucleus p, kv cache, var_length)
        "owt_genppl_bd3lm": (5000, 0.9, True, False),
        "owt_genppl_mdlm": (5000, 0.9, False, False),
        "owt_genppl_ar": (1, 0.9, True, False),
        "owt_genppl_sedd": (1000, 0.99, False, False),
        "owt_varlen_bd3lm": (5000, 0.9, True, True),
        "owt_varlen_ar": (1, 0.9, True, True),
        "owt_varlen_sedd": (1000, 0.99, False, True),
    }
    for name, (steps, p, cache, var_length) in expected.items():
        if needs_missing_algo(name):
            continue
        cfg = compose_experiment(name, "block_size=8", "model.length=2048")
        assert cfg.mode == "sample_eval" and cfg.loader.eval_batch_size == 1
        assert cfg.sampling.num_sample_batches == 25
        got = (cfg.algo.T, cfg.sampling.nucleus_p, cfg.sampling.kv_cache, cfg.sampling.var_length)
        assert got == (steps, p, cache, var_length), name
    cfg = compose_experiment("owt_genppl_bd3lm", "block_size=8", "model.length=2048")
    assert cfg.sampling.logdir == "outputs/samples/genppl_bd3lm_bs8_len2048"
    assert cfg.eval.checkpoint_path.startswith("outputs/slurm/owt_bd3lm_finetune_bs8/")


def test_fsdp_strategy_composes():
    cfg = compose_experiment("smoke", "strategy=fsdp")
    assert cfg.strategy.name == "fsdp" and cfg.strategy.sharding_strategy == "SHARD_GRAD_OP"


def test_submitit_launcher_config_composes_without_the_plugin():
    with initialize_config_dir(CONFIGS, version_base=None):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "checkpointing.save_dir=/tmp/x"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == (
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert launcher.gpus_per_node == launcher.tasks_per_node
    assert {"timeout_min", "partition", "nodes", "signal_delay_s"} <= set(launcher)
