"""scripts/table7_ordering.py's verdict: the paper's ordering on the per-sample means, and each
neighbour pair separated ('<' or '>') only when their 95% intervals are disjoint."""

from __future__ import annotations

import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import table7_ordering  # noqa: E402


def result(label: str, mean: float, half: float | None) -> dict:
    return {"label": label, "gen_ppl_mean_per_sample": mean, "gen_ppl_mean_per_sample_ci95": half}


def test_ordering_and_interval_separation():
    rows = [result("AR", 10.0, 1.0), result("K4", 12.5, 1.0), result("K16", 13.0, 1.0)]
    assert table7_ordering.ordering(rows) == (True, ["AR < K4", "K4 ~ K16"])
    rows.append(result("MDLM", 9.0, 0.5))
    assert table7_ordering.ordering(rows) == (False, ["AR < K4", "K4 ~ K16", "K16 > MDLM"])
    assert table7_ordering.ordering([result("a", 1.0, None), result("b", 1.5, None)]) == (
        True,
        ["a < b"],
    )


def test_every_variant_has_its_paper_row():
    numbers = table7_ordering.paper_tables.load_numbers()
    for _, paper_label, _ in table7_ordering.VARIANTS.values():
        row = table7_ordering.paper_row(numbers, paper_label)
        assert row["paper"] > 0 and row["paper_nfe"]
