"""The slurm template and launchers, and scripts/sample_stats.py.

Every launcher is run with a stub `sbatch` (in a copy of scripts/, so nothing is written in the
repository): each submission must name the template and an existing experiment, ask for one
task per GPU, and its main.py overrides must compose and pass validation and batch planning for
the GPUs it asks for."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess

import pytest
from hydra import compose, initialize_config_dir

import settings
from conftest import ROOT

pytestmark = pytest.mark.e2e  # the launchers run under bash with a stub sbatch

TEMPLATE = "scripts/slurm/job.sbatch"
LAUNCHER_DIRS = ("train", "eval", "gen_ppl", "var_len", "zero_shot")
LAUNCHERS = sorted(
    os.path.relpath(p, ROOT)
    for folder in LAUNCHER_DIRS
    for p in glob.glob(os.path.join(ROOT, "scripts", folder, "*.sh"))
)
EXPERIMENTS = {
    os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs/experiment/*.yaml"))
}
ALGOS = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs/algo/*.yaml"))}
SEP = "\x1f"
STUB = f"""#!/bin/bash
{{ for a in "$@"; do printf '%s{SEP}' "$a"; done; printf '\\n'; }} >> "$SBATCH_LOG"
echo "Submitted batch job 1"
"""
# variables the launchers read: cleared so that the defaults are what is tested
LAUNCHER_ENV = ("BLOCK_SIZES", "LENGTHS", "SEEDS", "PRETRAIN", "CKPT_ROOT", "SBATCH_ARGS")
LAUNCHER_ENV += ("SLURM", "TABLE_ONLY", "DATASETS", "ZS_ROOT")


@pytest.mark.parametrize("path", [TEMPLATE, *LAUNCHERS])
def test_bash_syntax(path):
    subprocess.run(["bash", "-n", os.path.join(ROOT, path)], check=True)


def test_template_directives():
    with open(os.path.join(ROOT, TEMPLATE)) as f:
        text = f.read()
    directives = dict(
        re.match(r"#SBATCH --([\w-]+)(?:=(.*))?", line).groups()
        for line in text.splitlines()
        if line.startswith("#SBATCH")
    )
    assert directives["output"] == "watch_folder/%x_%j.out"
    assert directives["signal"] == "SIGUSR1@90"
    assert directives["open-mode"] == "append" and "requeue" in directives
    assert directives["gres"] == "gpu:8" and directives["ntasks-per-node"] == "8"
    assert "constraint" in directives
    assert re.search(r'^srun "\$PYTHON" -u main\.py', text, re.M)


def test_template_pins_the_run_dir_to_the_job_name(tmp_path):
    """A requeued job keeps its name, so it runs in (and resumes from) the same directory;
    arguments come after the pinned keys so that they win."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SRUN_LOG": str(tmp_path / "srun.log"),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_NAME": "owt_bd3lm_finetune_bs4",
        "SLURM_JOB_NUM_NODES": "2",
        "PYTHON": "python",
    }
    cmd = ["bash", os.path.join(ROOT, TEMPLATE), "experiment=owt_ar", "seed=3"]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    args = (tmp_path / "srun.log").read_text().split("\n")[:-1]
    assert args == [
        "python",
        "-u",
        "main.py",
        "hydra.run.dir=outputs/slurm/owt_bd3lm_finetune_bs4",
        "trainer.num_nodes=2",
        "experiment=owt_ar",
        "seed=3",
    ]
    assert (tmp_path / "outputs/slurm/owt_bd3lm_finetune_bs4").is_dir()


def run_launcher(tmp_path, rel_path, env_extra=None, args=()) -> list[list[str]]:
    """Run a launcher from a copy of scripts/ with a stub sbatch; -> the argv of each call."""
    root = tmp_path / "repo"
    if not root.exists():
        shutil.copytree(os.path.join(ROOT, "scripts"), root / "scripts")
        (tmp_path / "sbatch").write_text(STUB)
        (tmp_path / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(SBATCH=str(tmp_path / "sbatch"), SBATCH_LOG=str(log), **(env_extra or {}))
    cmd = ["bash", str(root / rel_path), *args]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    assert (root / "watch_folder").is_dir()
    return [line.split(SEP)[:-1] for line in log.read_text().splitlines()]


def split_submission(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """sbatch argv -> ({option: value}, main.py overrides)."""
    assert TEMPLATE in argv, argv
    at = argv.index(TEMPLATE)
    options, rest = {}, argv[:at]
    while rest:
        opt = rest.pop(0)
        assert opt.startswith("-"), argv
        if "=" in opt:
            key, value = opt.split("=", 1)
        elif opt in ("-J", "-p", "-N", "-t"):
            key, value = opt, rest.pop(0)
        else:
            key, value = opt, ""
        options[key] = value
    return options, argv[at + 1 :]


def check_submission(argv: list[str], seen: set) -> str:
    """Compose and validate one submission's overrides; -> its experiment name."""
    options, overrides = split_submission(argv)
    assert "-J" in options, argv
    gpus = int(options.get("--gres", "gpu:8").split(":")[-1])
    assert int(options.get("--ntasks-per-node", 8)) == gpus, argv
    nodes = int(options.get("--nodes", 1))
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    assert len(names) == 1 and names[0] in EXPERIMENTS, overrides
    algo = [o.split("=", 1)[1] for o in overrides if o.startswith("algo=")]
    with open(os.path.join(ROOT, "configs/experiment", f"{names[0]}.yaml")) as f:
        algo += re.findall(r"override /algo: (\w+)", f.read())
    if algo and algo[0] not in ALGOS:
        return names[0]  # e.g. algo=sedd before configs/algo/sedd.yaml lands
    kept = [o for o in overrides if not o.startswith(("hydra.", "seed="))]
    key = (tuple(kept), gpus, nodes)
    if key in seen:
        return names[0]
    seen.add(key)
    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base=None):
        cfg = compose("config", overrides=[*kept, "checkpointing.save_dir=/tmp/x"])
    settings.validate(cfg, settings.Hardware("gpu", gpus, nodes, "bf16-mixed"))
    settings.plan_batches(cfg.loader, gpus * nodes, cfg.trainer.accumulate_grad_batches)
    return names[0]


def test_launchers_submit_valid_jobs(tmp_path):
    seen: set = set()
    job_names: dict[str, str] = {}
    counts = {}
    for rel in LAUNCHERS:
        if os.path.basename(rel) == "zs_table.sh":
            continue
        env, args = {}, ()
        if os.path.basename(rel) == "zs_ppl.sh":
            env, args = {"SLURM": "1"}, ("bd3lm", "kuleshov-group/bd3lm-owt-block_size4", "4")
        calls = run_launcher(tmp_path, rel, env, args)
        assert calls, f"{rel} submitted nothing"
        counts[rel] = len(calls)
        for argv in calls:
            check_submission(argv, seen)
            name = split_submission(argv)[0]["-J"]
            if rel.startswith("scripts/train/"):  # one run directory per training run
                assert job_names.setdefault(name, rel) == rel, name
    assert counts["scripts/gen_ppl/genppl_bd3lm.sh"] == 2 * 3 * 12
    assert counts["scripts/var_len/varlen_bd3lm.sh"] == 20
    assert counts["scripts/train/train_owt_bd3lm.sh"] == 3


def test_sampling_seeds_share_a_logdir_and_run_one_at_a_time(tmp_path):
    calls = run_launcher(tmp_path, "scripts/gen_ppl/genppl_mdlm.sh", {"LENGTHS": "2048"})
    assert len(calls) == 12
    logdirs, seeds = set(), []
    for argv in calls:
        options, overrides = split_submission(argv)
        assert options["--dependency"] == "singleton" and "--no-requeue" in options
        assert options["-J"] == "genppl_mdlm_len2048"
        logdirs |= {o for o in overrides if o.startswith("sampling.logdir=")}
        seeds += [o for o in overrides if o.startswith("seed=")]
    assert logdirs == {"sampling.logdir=outputs/samples/genppl_mdlm_len2048"}
    assert seeds == [f"seed={s}" for s in range(1, 13)]


def test_launcher_passes_extra_arguments_last(tmp_path):
    root = tmp_path / "repo"
    run_launcher(tmp_path, "scripts/train/train_owt_ar.sh")  # creates the copy
    log = tmp_path / "sbatch.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(SBATCH=str(tmp_path / "sbatch"), SBATCH_LOG=str(log), SBATCH_ARGS="-p gpu")
    script = root / "scripts/train/train_owt_bd3lm.sh"
    subprocess.run(["bash", str(script), "trainer.max_steps=10"], check=True, env=env)
    calls = [line.split(SEP)[:-1] for line in log.read_text().splitlines()]
    assert len(calls) == 3
    for argv in calls:
        assert argv[:2] == ["-p", "gpu"] and argv[-1] == "trainer.max_steps=10"


def test_zero_shot_table_submits_every_model_and_dataset(tmp_path):
    env = {"SLURM": "1", "AR_CKPT": "a.ckpt", "MDLM_CKPT": "m.ckpt", "BD3LM_CKPT": "b.ckpt"}
    env["SEDD_CKPT"] = "s.ckpt"
    calls = run_launcher(tmp_path, "scripts/zero_shot/zs_table.sh", env)
    assert len(calls) == 4 * 7
    seen: set = set()
    for argv in calls:
        assert check_submission(argv, seen) == "owt_zeroshot"
        overrides = split_submission(argv)[1]
        assert any(o.startswith("hydra.run.dir=outputs/zero_shot/") for o in overrides)


# ----------------------------------------------------------------------------------------------
# scripts/sample_stats.py
# ----------------------------------------------------------------------------------------------
def load_sample_stats():
    spec = importlib.util.spec_from_file_location(
        "sample_stats", os.path.join(ROOT, "scripts", "sample_stats.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(seed, length, entropy, nfe, total, ppl):
    nll, count = (math.log(ppl) * 10, 10) if ppl is not None else (None, None)
    return {
        "index": 0,
        "seed": seed,
        "rank": 0,
        "prompt": None,
        "text": "x",
        "token_ids": [1] * length,
        "length": length,
        "stop_reason": "length",
        "entropy": entropy,
        "gen_ppl": ppl,
        "gen_nll_sum": nll,
        "gen_num_tokens": count,
        "nfe_denoise": nfe,
        "nfe_total": total,
    }


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_sample_stats_numbers_and_plot(tmp_path, capsys):
    stats = load_sample_stats()
    a, b = tmp_path / "samples" / "a", tmp_path / "samples" / "b"
    write_jsonl(
        a / "samples.jsonl", [record(1, 10, 2.0, 8, 10, 20.0), record(1, 30, 3, 10, 12, None)]
    )
    write_jsonl(a / "samples.rank1.jsonl", [record(2, 20, 4.0, 12, 14, 40.0)])
    write_jsonl(
        b / "samples.jsonl", [record(3, 40, 1, 40, 40, 10.0), record(3, 50, 1.5, 50, 50, 12)]
    )
    (b / "samples.jsonl").write_text((b / "samples.jsonl").read_text() + "\n")  # blank line
    out, plot = tmp_path / "summary.json", tmp_path / "genppl_vs_nfe.png"
    assert stats.main([str(tmp_path / "samples"), "--out", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    run_a = result["runs"][str(a)]
    assert run_a["num_samples"] == 3 and run_a["num_scored"] == 2
    assert run_a["gen_ppl_mean_per_sample"] == pytest.approx(30.0)  # null skipped
    assert run_a["gen_ppl_std"] == pytest.approx(math.sqrt(200.0))  # (20, 40)
    assert run_a["gen_ppl_ci95"] == pytest.approx(1.959964 * math.sqrt(200.0) / math.sqrt(2))
    assert run_a["nfe_denoise_mean"] == pytest.approx(10.0)
    assert run_a["nfe_total_mean"] == pytest.approx(12.0)
    assert run_a["entropy_mean"] == pytest.approx(3.0)
    assert (run_a["length_median"], run_a["length_max"]) == (20, 30)
    assert run_a["seeds"] == [1, 2]
    run_b = result["runs"][str(b)]
    assert run_b["gen_ppl_mean_per_sample"] == pytest.approx(11.0)
    assert run_b["length_median"] == pytest.approx(45.0)
    total = result["total"]
    assert total["num_samples"] == 5 and total["num_scored"] == 4
    assert total["gen_ppl_mean_per_sample"] == pytest.approx(20.5)  # (20 + 40 + 10 + 12) / 4
    assert total["nfe_denoise_mean"] == pytest.approx(24.0)  # (8 + 10 + 12 + 40 + 50) / 5
    assert total["length_median"] == 30 and total["length_max"] == 50
    assert total["gen_ppl_token_weighted"] == pytest.approx((20 * 40 * 10 * 12) ** 0.25)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "TOTAL" in printed and "2 point(s)" in printed


def test_sample_stats_without_samples_fails_in_one_line(tmp_path, capsys):
    stats = load_sample_stats()
    assert stats.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
