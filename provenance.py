"""Provenance: which code, packages, hardware, data, checkpoint and config produced an output.

`record(...)` builds one JSON-ready dict; main.py writes it to `RUN_DIR/provenance.json`, into
`ppl_eval.json` and `sample_eval.json` (key "provenance") and into every checkpoint (key
"provenance", set on the module before training). Nothing here raises on a missing git, a
directory that is not a repository or an unreadable checkpoint: the field is null and a
`*_reason` field says why. Lightning-free and Hydra-free (omegaconf only to read a DictConfig).

Fields (docs/provenance.md has the full contract):
  git: {commit, dirty, reason}; dirty counts modified tracked files and untracked files that
    are not ignored (`git status --porcelain`).
  version: the project's version from pyproject.toml ([project] version).
  packages: python, torch, lightning, transformers versions (null when not installed).
  device, precision, world_size: from the run's settings.Hardware.
  data_cache: {split: token-cache name (data.options.cache_name)}, null for a streamed split.
  checkpoint: {path, file, sha256, hub_revision, reason} for evaluations (and fine-tuning).
  seed, config_sha256: the run seed and `config_hash` of the resolved config.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import tomllib
from collections.abc import Mapping
from typing import Any

ROOT = os.path.dirname(os.path.abspath(__file__))
GIT_TIMEOUT_S = 5.0
PACKAGES = ("torch", "lightning", "transformers")
RUN_DIR_TOKEN = "${run_dir}"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # as checkpoints.layout reads them
SNAPSHOT = re.compile(r"(?:^|[\\/])snapshots[\\/]([0-9a-f]{40})(?:[\\/]|$)")
CHUNK = 1 << 20


def _git(repo_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", repo_dir, *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=False,
    )


def git_state(repo_dir: str = ROOT) -> dict[str, Any]:
    """{commit, dirty, reason} of the git work tree holding `repo_dir`; commit and dirty are
    None with a one-line reason when git is missing, times out or `repo_dir` is not in a
    repository (never raises)."""
    try:
        head = _git(repo_dir, "rev-parse", "HEAD")
        if head.returncode != 0:
            reason = (head.stderr.strip().splitlines() or ["git rev-parse HEAD failed"])[0]
            return {"commit": None, "dirty": None, "reason": reason[:200]}
        status = _git(repo_dir, "status", "--porcelain")
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "reason": "git is not installed"}
    except subprocess.TimeoutExpired:
        return {"commit": None, "dirty": None, "reason": f"git timed out after {GIT_TIMEOUT_S} s"}
    except OSError as err:
        return {"commit": None, "dirty": None, "reason": f"git failed ({type(err).__name__})"}
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    reason = None if status.returncode == 0 else "git status failed"
    return {"commit": head.stdout.strip(), "dirty": dirty, "reason": reason}


def project_version(root: str = ROOT) -> str | None:
    """[project] version of `root`/pyproject.toml, or None when absent or unreadable."""
    try:
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            return tomllib.load(f).get("project", {}).get("version")
    except (OSError, tomllib.TOMLDecodeError):
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_identity(path: str | None) -> dict[str, Any] | None:
    """{path, file, sha256, hub_revision, reason} of a checkpoint: a file is hashed itself; an
    HF directory by its weights file (model.safetensors, else pytorch_model.bin); a hub id by
    the weights file of its local snapshot. `hub_revision`: the commit of a hub snapshot
    directory (.../snapshots/<commit>/, what a hub id resolves to), else None. None for no path;
    sha256 None with a reason when nothing can be read (never raises)."""
    if not path:
        return None
    out: dict[str, Any] = {
        "path": str(path),
        "file": None,
        "sha256": None,
        "hub_revision": None,
        "reason": None,
    }
    directory = str(path)
    try:
        if os.path.isfile(directory):
            out["file"] = os.path.basename(directory)
            out["sha256"] = file_sha256(directory)
            return out
        if not os.path.isdir(directory):
            from checkpoints.layout import is_hub_id, resolve_pretrained

            if not is_hub_id(directory):
                out["reason"] = "no such file or directory"
                return out
            directory = resolve_pretrained(directory)  # the snapshot already fetched by the run
        found = SNAPSHOT.search(os.path.abspath(directory))  # a hub snapshot: its commit
        out["hub_revision"] = found[1] if found else None
        for name in WEIGHT_FILES:
            weights = os.path.join(directory, name)
            if os.path.isfile(weights):
                out["file"] = name
                out["sha256"] = file_sha256(weights)
                return out
        out["reason"] = f"no weights file ({', '.join(WEIGHT_FILES)}) in {directory}"
    except Exception as err:  # noqa: BLE001 - provenance never fails a run
        out["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return out


def _relative_to_run_dir(value: Any, run_dir: str | None) -> Any:
    """Strings equal to or under run_dir become `${run_dir}` + the rest, recursively."""
    if run_dir is None:
        return value
    if isinstance(value, dict):
        return {k: _relative_to_run_dir(v, run_dir) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_relative_to_run_dir(v, run_dir) for v in value]
    if isinstance(value, str) and (value == run_dir or value.startswith(run_dir + os.sep)):
        return RUN_DIR_TOKEN + value[len(run_dir) :]
    return value


def config_hash(config: Mapping[str, Any], run_dir: str | None = None) -> str:
    """sha256 of the resolved config (plain containers) as sorted-key compact JSON (non-JSON
    leaves as str).

    Paths under `run_dir` (checkpointing.save_dir = the Hydra run directory, and the keys
    derived from it: resume_ckpt_path, the default eval.checkpoint_path) are hashed relative
    to it, so one config run in two directories hashes the same; every other value counts,
    `mode` and `seed` included.
    """
    plain = dict(config)
    if run_dir is not None:
        plain = _relative_to_run_dir(plain, os.path.abspath(run_dir).rstrip(os.sep))
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def device_name(accelerator: str) -> str:
    """ "cpu", or the CUDA device's name (of device 0) for GPU runs."""
    if accelerator != "gpu":
        return "cpu"
    try:
        import torch

        return f"cuda: {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        return "cuda"


def record(
    config: Mapping[str, Any],
    hardware: Any = None,
    *,
    run_dir: str | None = None,
    data_cache: Mapping[str, str | None] | None = None,
    checkpoint: str | None = None,
    repo_dir: str = ROOT,
) -> dict[str, Any]:
    """The provenance record of a run of `config` (the resolved config, plain containers).

    hardware: a settings.Hardware (accelerator, precision, world_size) or None; data_cache:
    {split: cache name or None} of the token caches the run reads; checkpoint: the evaluated
    (or fine-tuned from) checkpoint path, directory or hub id; repo_dir: where to ask git.
    """
    return {
        "git": git_state(repo_dir),
        "version": project_version(),
        "packages": package_versions(),
        "device": device_name(hardware.accelerator) if hardware is not None else None,
        "precision": hardware.precision if hardware is not None else None,
        "world_size": hardware.world_size if hardware is not None else None,
        "data_cache": dict(data_cache) if data_cache is not None else {},
        "checkpoint": checkpoint_identity(checkpoint),
        "seed": config["seed"],
        "config_sha256": config_hash(config, run_dir),
    }


def cache_name_of(dataset: Any) -> str | None:
    """The token-cache name a dataset was loaded from (data.cache.TokenDataset.path's last
    component), None for streamed or in-memory datasets."""
    path = getattr(dataset, "path", None)
    return os.path.basename(path.rstrip("/")) if isinstance(path, str) else None


def write(run_dir: str, prov: dict[str, Any]) -> str:
    """RUN_DIR/provenance.json (atomically); returns its path."""
    from utils import atomic_path

    path = os.path.join(run_dir, "provenance.json")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(prov, f, indent=2)
        f.write("\n")
    return path
