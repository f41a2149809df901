"""The objective registry (registry/): each entry builds its objective from its YAML, fixes K
as its objective does, picks its sampler; and nothing outside an objective's own modules
names it in code (issue: adding an objective is its module, its entry and its YAML)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
from omegaconf import OmegaConf

import registry
from conftest import ROOT
from noise_schedule import LogLinear

CONFIGS = pathlib.Path(ROOT) / "configs" / "algo"
TRAINING = {"antithetic_sampling": True, "resample": False, "eval_nll": True}


def algo_node(name: str) -> dict:
    """configs/algo/NAME.yaml's `algo` keys (global-package files nest them under `algo`)."""
    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    return node.get("algo", node)


def test_every_algo_yaml_has_an_entry_and_back():
    assert set(registry.OBJECTIVES) == {p.stem for p in CONFIGS.glob("*.yaml")}
    for name, spec in registry.OBJECTIVES.items():
        assert spec.name == name == algo_node(name)["name"]


@pytest.mark.parametrize("name", sorted(registry.OBJECTIVES))
def test_entry_builds_its_objective_from_its_yaml(name):
    objective = registry.build_objective(algo_node(name), TRAINING, LogLinear(), 7, 16, 4)
    capabilities = objective.capabilities
    assert objective.block_size == {"ar": 1, "mdlm": 16, "sedd": 16}.get(name, 4)
    spec = registry.objective_spec(name)
    assert spec.causal == (name == "ar")
    assert capabilities.ppl_eval == (name != "ssdlm")
    assert capabilities.two_stream == (name == "bd3lm")


def test_block_size_of_follows_the_objective():
    """K of each objective for a context of 32 tokens when the config says 4: AR 1, MDLM and
    SEDD the context, BD3-LM and SSD-LM the config's; BD3-LM without its two-stream input is
    MDLM's objective (one block)."""
    got = {name: registry.block_size_of(algo_node(name), 32, 4) for name in registry.OBJECTIVES}
    assert got == {"ar": 1, "mdlm": 32, "sedd": 32, "bd3lm": 4, "ssdlm": 4}
    one_stream = {**algo_node("bd3lm"), "cross_attn": False}
    assert registry.block_size_of(one_stream, 32, 4) == 32
    spec = registry.objective_spec("bd3lm")
    assert spec.family(registry.algo_settings(one_stream)[1]) == "mdlm"


def test_unknown_objective_names_the_valid_ones():
    with pytest.raises(ValueError, match="algo.name='dlm': valid are bd3lm, mdlm, ar, sedd"):
        registry.objective_spec("dlm")


def test_algo_settings_read_only_declared_keys():
    settings = registry.algo_settings({**algo_node("ssdlm"), "unrelated": 1})[1]
    assert settings.top_p == 0.95 and settings.context == "previous_block"
    assert registry.algo_settings({"name": "ssdlm"})[1].top_p is None


# ----------------------------------------------------------------------------------------------
# An objective's name in code (not in comments or docstrings) only in its own modules
# ----------------------------------------------------------------------------------------------
PRODUCTION = ("algorithms", "models", "sampling", "checkpoints", "registry", "hf", "settings")
PRODUCTION_FILES = ("main.py", "builders.py", "diffusion.py", "metrics.py", "evaluation")
SSDLM = re.compile(r"ssd.?lm", re.IGNORECASE)
SSDLM_OWN = {
    "algorithms/ssdlm.py",
    "models/ssdlm.py",
    "sampling/ssdlm.py",
    "registry/ssdlm.py",
    "registry/__init__.py",  # the registry's list of entries imports registry/ssdlm.py
    "models/backbone.py",  # the backbones' registry: its network's entry (roberta)
}


def code_names(path: pathlib.Path) -> set[str]:
    """Identifiers, imported module names and string constants of `path`, docstrings left
    out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            docstrings.add(id(first.value))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias.name for alias in node.names} | {getattr(node, "module", "") or ""}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                names.add(node.value)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def test_only_ssdlms_own_modules_name_it_in_code():
    root = pathlib.Path(ROOT)
    files = [p for entry in PRODUCTION for p in sorted((root / entry).rglob("*.py"))]
    files += [
        p
        for entry in PRODUCTION_FILES
        for p in ((root / entry).rglob("*.py") if (root / entry).is_dir() else [root / entry])
    ]
    naming = {
        str(path.relative_to(root))
        for path in files
        if any(SSDLM.search(name) for name in code_names(path))
    }
    assert naming <= SSDLM_OWN, sorted(naming - SSDLM_OWN)
