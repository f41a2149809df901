"""The provenance record (provenance.py, docs/provenance.md): git state of a temporary
repository, null-with-reason outside one, checkpoint hashes equal to hashlib's, a config hash
that ignores the run directory but no key, and the record in every output of a smoke run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tomllib

import pytest
import torch
from omegaconf import OmegaConf

import main
import provenance
from conftest import ROOT, run_inprocess

GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "init.defaultBranch=m"]


def git(repo, *args) -> str:
    return subprocess.run(
        [*GIT, "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_git_state_of_a_temporary_repository(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "commit", "-q", "-m", "first")
    state = provenance.git_state(str(tmp_path))
    assert state == {"commit": git(tmp_path, "rev-parse", "HEAD"), "dirty": False, "reason": None}
    (tmp_path / "a.txt").write_text("two\n")
    assert provenance.git_state(str(tmp_path))["dirty"] is True
    sub = tmp_path / "sub"  # any directory inside the work tree names its repository
    sub.mkdir()
    assert provenance.git_state(str(sub))["commit"] == state["commit"]


def test_no_repository_or_no_git_is_null_with_a_reason(tmp_path, monkeypatch):
    outside = provenance.git_state(str(tmp_path))  # pytest's tmp dirs are in no repository
    assert outside["commit"] is None and outside["dirty"] is None and outside["reason"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable on PATH
    missing = provenance.git_state(str(tmp_path))
    assert missing == {"commit": None, "dirty": None, "reason": "git is not installed"}


def test_checkpoint_sha256_equals_hashlib(tmp_path):
    blob = os.urandom(3 * provenance.CHUNK + 17)  # several read chunks
    (tmp_path / "last.ckpt").write_bytes(blob)
    expected = hashlib.sha256(blob).hexdigest()
    one = provenance.checkpoint_identity(str(tmp_path / "last.ckpt"))
    assert one["sha256"] == expected and one["file"] == "last.ckpt" and one["reason"] is None
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf = tmp_path / "models--org--name" / "snapshots" / commit  # a hub snapshot's layout
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(blob[::-1])
    directory = provenance.checkpoint_identity(str(hf))
    assert directory["sha256"] == hashlib.sha256(blob[::-1]).hexdigest()
    assert directory["file"] == "model.safetensors" and directory["hub_revision"] == commit
    (hf / "model.safetensors").unlink()
    assert provenance.checkpoint_identity(str(hf))["reason"].startswith("no weights file")
    offline = provenance.checkpoint_identity("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1
    assert offline["sha256"] is None and offline["reason"]
    assert provenance.checkpoint_identity(None) is None


def test_config_hash_is_stable_and_sees_every_key(tmp_path):
    def digest(run_dir, *overrides):
        cfg = main.compose(["experiment=smoke", *overrides], str(run_dir))
        return provenance.config_hash(OmegaConf.to_container(cfg, resolve=True), str(run_dir))

    first = digest(tmp_path / "a")
    assert digest(tmp_path / "a") == first
    assert digest(tmp_path / "b") == first  # another run directory, the same config
    assert digest(tmp_path / "a", "seed=2") != first
    assert digest(tmp_path / "a", "loader.eval_global_batch_size=16") != first
    assert digest(tmp_path / "a", "eval.checkpoint_path=/elsewhere/last.ckpt") != first


def test_versions_come_from_pyproject_and_the_environment():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert provenance.project_version() == tomllib.load(f)["project"]["version"]
    packages = provenance.package_versions()
    assert packages["torch"] == torch.__version__ and packages["python"]
    assert set(packages) == {"python", "torch", "lightning", "transformers"}


@pytest.mark.e2e
def test_every_output_carries_the_record(smoke_checkpoint, data_cache, tmp_path):
    """Checkpoint (written by the session's smoke training), the training run directory,
    ppl_eval.json and sample_eval.json (about 3 s beyond the shared smoke checkpoint)."""
    stored = torch.load(smoke_checkpoint, weights_only=True)["provenance"]
    train_dir = smoke_checkpoint.parent.parent
    assert json.loads((train_dir / "provenance.json").read_text()) == stored
    assert set(stored["data_cache"]) == {"train", "valid"}
    assert stored["checkpoint"] is None and stored["seed"] == 1
    for split, name in stored["data_cache"].items():
        assert os.path.isfile(os.path.join(data_cache, name, "meta.json")), split

    run_inprocess(tmp_path / "ppl", "mode=ppl_eval", f"eval.checkpoint_path={smoke_checkpoint}")
    prov = json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())["provenance"]
    assert prov == json.loads((tmp_path / "ppl" / "provenance.json").read_text())
    assert prov["checkpoint"]["sha256"] == hashlib.sha256(smoke_checkpoint.read_bytes()).hexdigest()
    assert prov["data_cache"]["valid"] == stored["data_cache"]["valid"]
    assert (prov["device"], prov["precision"], prov["world_size"]) == ("cpu", "32-true", 1)
    assert prov["version"] == provenance.project_version()
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["git"]["commit"] == head.stdout.strip()
    else:
        assert prov["git"]["commit"] is None and prov["git"]["reason"]

    run_inprocess(tmp_path / "s", "mode=sample_eval", f"eval.checkpoint_path={smoke_checkpoint}")
    summary = json.loads((tmp_path / "s" / "sample_eval.json").read_text())
    assert summary["provenance"]["checkpoint"]["sha256"] == prov["checkpoint"]["sha256"]
    assert summary["provenance"]["data_cache"] == {}
