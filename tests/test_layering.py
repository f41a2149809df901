"""The maths imports neither Lightning nor Hydra, and nothing imports main.py."""

from __future__ import annotations

import ast
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
    root = pathlib.Path(ROOT)
    for path in root.rglob("*.py"):
        skipped = {".venv", "tests", "benchmarks", "scripts"}
        if skipped & set(path.relative_to(root).parts) or path.name == "main.py":
            continue
        assert "main" not in imported_modules(path), f"{path} imports main"
