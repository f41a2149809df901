"""The mutation catalogue (scripts/mutants.toml) against the code: a formula moved without its
anchor is noticed by `make test`, not by the next `make mutation` refusing to start. No mutant
may name this file among its tests: under a mutant its anchor is gone and this test fails, a
false kill."""

from __future__ import annotations

import os
import sys

from conftest import ROOT


def test_every_anchor_occurs_once_and_every_named_test_file_exists():
    scripts = os.path.join(ROOT, "scripts")
    sys.path.insert(0, scripts)
    try:
        import mutation
    finally:
        sys.path.remove(scripts)
    mutants = mutation.load_catalogue()
    mutation.check_anchors(mutants, ROOT)
    named = {t.split("::")[0] for m in mutants for t in m.tests}
    assert "tests/test_mutant_catalogue.py" not in named
    assert not {t for t in named if not os.path.isfile(os.path.join(ROOT, t))}
