"""The maths imports neither Lightning nor Hydra, nothing imports main.py, no production module
(anything outside tests/ and scripts/, benchmarks/ included) imports from scripts/, and imports
point one way: models/ <- algorithms/ <- sampling/ <- checkpoints/ <- registry/ <- hf/ and the
run's assembly (README "Code map")."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

from conftest import ROOT

PURE = [
    "models",
    "algorithms",
    "sampling",
    "noise_schedule.py",
    "metrics.py",
    "checkpoints",
    "registry",
    "hf",
]
FORBIDDEN = {"lightning", "pytorch_lightning", "hydra", "omegaconf"}

# What each package of the maths never imports (top-level names): the layers above it. The run's
# assembly: settings/, evaluation/, diffusion.py, builders.py and main.py
ASSEMBLY = {"settings", "evaluation", "diffusion", "builders", "main"}
NOT_IMPORTED = {
    "models": {"algorithms", "sampling", "checkpoints", "registry", "hf"} | ASSEMBLY,
    "algorithms": {"sampling", "checkpoints", "registry", "hf"} | ASSEMBLY,
    "sampling": {"checkpoints", "registry", "hf"} | ASSEMBLY,
    "checkpoints": {"registry", "hf"} | (ASSEMBLY - {"settings"}),
    "registry": {"hf"} | ASSEMBLY,
}


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


TYPE_CHECKING = {"TYPE_CHECKING", "typing.TYPE_CHECKING"}  # how `if TYPE_CHECKING:` is spelt


def runtime_imports(path: pathlib.Path) -> dict[str, int]:
    """{top-level module name: first line importing it} of every import `path` can execute:
    module-level and function-level (lazy) ones alike; not the bodies of `if TYPE_CHECKING:`,
    which never run (annotations only: checkpoints/ names diffusion.Diffusion that way).
    Relative imports are left out: they stay inside the file's own top-level package."""
    found: dict[str, int] = {}

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in TYPE_CHECKING:
            for child in node.orelse:
                visit(child)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.mark.parametrize("package", sorted(NOT_IMPORTED))
def test_imports_point_one_way(package):
    """`package` imports nothing from the layers above it, lazily inside a function included."""
    root = pathlib.Path(ROOT)
    bad = [
        f"{path.relative_to(root)}:{line} imports {name}"
        for path in python_files(package)
        for name, line in runtime_imports(path).items()
        if name in NOT_IMPORTED[package]
    ]
    assert not bad, f"{package}/ must not import {sorted(NOT_IMPORTED[package])}: {bad}"


def test_runtime_imports_sees_lazy_imports_and_skips_type_checking(tmp_path):
    """The walk the rules rely on: a function's import counts, an annotation-only one not."""
    path = tmp_path / "module.py"
    path.write_text(
        "import typing\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from diffusion import Diffusion\n"
        "if typing.TYPE_CHECKING:\n"
        "    import main\n"
        "else:\n"
        "    import sampling.block\n"
        "def f():\n"
        "    from hf.export import export\n"
        "from . import sibling\n"
    )
    assert runtime_imports(path) == {"typing": 1, "sampling": 8, "hf": 10}
