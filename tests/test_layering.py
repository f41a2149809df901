"""The maths imports neither Lightning nor Hydra, nothing imports main.py, and no production
module (anything outside tests/ and scripts/, benchmarks/ included) imports from scripts/."""

from __future__ import annotations

import ast
import os
import pathlib

from conftest import ROOT

PURE = [
    "models",
    "algorithms",
    "sampling",
    "noise_schedule.py",
    "metrics.py",
    "checkpoints",
]
FORBIDDEN = {"lightning", "pytorch_lightning", "hydra", "omegaconf"}


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def python_files(*entries: str) -> list[pathlib.Path]:
    root = pathlib.Path(ROOT)
    files = []
    for entry in entries:
        path = root / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_maths_is_free_of_lightning_and_hydra():
    for path in python_files(*PURE):
        bad = imported_modules(path) & FORBIDDEN
        assert not bad, f"{path} imports {bad}"


def test_nothing_imports_main():
    """Only tests (and tools that drive whole runs) may call main; the code below it never."""
    for path in repository_files(skip=("tests", "benchmarks", "scripts")):
        if path.name == "main.py":
            continue
        assert "main" not in imported_modules(path), f"{path} imports main"


def repository_files(skip: tuple[str, ...]) -> list[pathlib.Path]:
    """The .py files of the repository outside hidden directories (.venv, .git), build/ (pip's)
    and the top-level directories `skip` (pruned, never walked)."""
    files = []
    for parent, dirs, names in os.walk(ROOT):
        top = parent == ROOT
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (top and d in (*skip, "build"))]
        files += [pathlib.Path(parent, name) for name in names if name.endswith(".py")]
    return sorted(files)


def test_no_production_module_imports_scripts():
    """scripts/ holds command-line entry points over the code, never code the code needs: it is
    no installed package (pyproject), so an import of it fails outside the repository. Caught
    as `scripts.*` and as a script's bare name (a module that put scripts/ on sys.path)."""
    root = pathlib.Path(ROOT)
    scripts = {"scripts"} | {path.stem for path in (root / "scripts").glob("*.py")}
    files = repository_files(skip=("tests", "scripts"))
    assert {root / "evaluation" / "lm_harness.py", root / "benchmarks" / "train.py"} <= set(files)
    for path in files:
        bad = imported_modules(path) & scripts
        assert not bad, f"{path.relative_to(root)} imports {sorted(bad)} from scripts/"
