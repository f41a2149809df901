"""Error bars of ppl_eval's Monte-Carlo NELBO (metrics.row_statistics / nll_stderr,
docs/error_bars.md): the formulas against direct computations, zero error for exact
objectives, and on the smoke model an error that shrinks as 1/sqrt(eval.mc_samples) with
estimates that agree within their error bars."""

from __future__ import annotations

import json
import math

import pytest
import torch

import settings
from conftest import compose_cfg, run_inprocess, tiny_module
from metrics import nll_stderr, ppl_interval, row_statistics
from utils import UserError


def test_between_draws_error_is_the_spread_of_each_rows_mean():
    torch.manual_seed(0)
    draws = torch.rand(5, 7, dtype=torch.float64) * 10  # 5 draws of 7 rows
    tokens = torch.tensor([3.0, 4, 4, 0, 2, 5, 1], dtype=torch.float64)
    draws[:, 3] = 0  # a padding row: no tokens, no terms
    stats = row_statistics(draws[:, :4], tokens[:4]) + row_statistics(draws[:, 4:], tokens[4:])
    nll = float(draws.mean(0).sum() / tokens.sum())
    stderr, method = nll_stderr(nll, float(tokens.sum()), stats, draws=5, exact=False)
    expected = math.sqrt(float((draws.var(0) / 5).sum())) / float(tokens.sum())
    assert method == "between_draws" and stderr == pytest.approx(expected, rel=1e-12)


def test_one_draw_error_is_the_ratio_estimators_delta_method():
    torch.manual_seed(1)
    sums = torch.rand(1, 9, dtype=torch.float64) * 20
    tokens = torch.randint(1, 6, (9,)).double()
    nll = float(sums.sum() / tokens.sum())
    stderr, method = nll_stderr(nll, float(tokens.sum()), row_statistics(sums, tokens), 1, False)
    residual = sums[0] - nll * tokens
    expected = math.sqrt(9 / 8 * float((residual**2).sum())) / float(tokens.sum())
    assert method == "between_rows" and stderr == pytest.approx(expected, rel=1e-9)
    low, high = ppl_interval(nll, stderr)
    assert low == pytest.approx(math.exp(nll - 1.959964 * stderr), rel=1e-6)
    assert high == pytest.approx(math.exp(nll + 1.959964 * stderr), rel=1e-6)
    assert nll_stderr(nll, 10.0, row_statistics(sums, tokens), 1, exact=True) == (0.0, "exact")
    assert ppl_interval(nll, None) is None


@pytest.mark.parametrize(
    ("algo", "overrides", "exact"),
    [("ar", (), True), ("bd3lm", ("block_size=1",), True), ("bd3lm", (), False),
     ("mdlm", (), False)],
)  # fmt: skip
def test_exact_objectives_are_recognised(algo, overrides, exact):
    module = tiny_module(algo, 16, *overrides)
    assert module.exact_eval(module.algorithm.eval_interval()) is exact


@pytest.mark.e2e
def test_error_shrinks_as_one_over_sqrt_draws(smoke_checkpoint, data_cache, tmp_path):
    """64 validation rows of the smoke model at 1, 4 and 16 draws (about 15 s)."""
    results = {}
    for n in (1, 4, 16):
        run_dir = tmp_path / f"n{n}"
        run_inprocess(
            run_dir,
            "mode=ppl_eval",
            f"eval.checkpoint_path={smoke_checkpoint}",
            "trainer.limit_val_batches=8",
            f"eval.mc_samples={n}",
        )
        results[n] = json.loads((run_dir / "ppl_eval.json").read_text())
    one, four, sixteen = results[1], results[4], results[16]
    assert one["nll_stderr_method"] == "between_rows" and one["mc_samples"] == 1
    assert four["nll_stderr_method"] == sixteen["nll_stderr_method"] == "between_draws"
    assert 1.6 < four["nll_stderr"] / sixteen["nll_stderr"] < 2.5  # sqrt(16 / 4) = 2
    for a, b in ((one, sixteen), (four, sixteen), (one, four)):
        assert abs(a["nll"] - b["nll"]) < 3 * math.hypot(a["nll_stderr"], b["nll_stderr"])
    for r in results.values():
        low, high = r["ppl_ci95"]
        assert low < r["ppl"] < high and r["num_tokens"] == 64 * 31


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "true"])
def test_mc_samples_must_be_a_positive_integer(value):
    with pytest.raises(UserError, match=r"eval\.mc_samples"):
        settings.validate(compose_cfg("mode=ppl_eval", f"eval.mc_samples={value}"))
