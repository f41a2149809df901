"""evaluation.lm_harness: the lm-eval model `bd3lm` on the smoke checkpoint, offline: a local
multiple-choice task and a local generation task through simple_evaluate; the conditional
NELBO's spread shrinks with mc_samples; a deterministic bound at t = 1."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import ROOT

lm_eval = pytest.importorskip("lm_eval")

TASKS = os.path.join(ROOT, "tests", "data", "lm_eval_tasks")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The task YAMLs with their JSONL paths made absolute."""
    out = tmp_path_factory.mktemp("tasks")
    for name in os.listdir(TASKS):
        with open(os.path.join(TASKS, name)) as f:
            text = f.read()
        text = text.replace("tests/data/lm_eval_tasks/", TASKS + "/")
        (out / name).write_text(text)
    return str(out)


@pytest.fixture(scope="module")
def harness(smoke_checkpoint):
    from evaluation.lm_harness import BD3LMHarness

    return BD3LMHarness(checkpoint=str(smoke_checkpoint), mc_samples=4, device="cpu")


@pytest.mark.e2e
def test_simple_evaluate_multiple_choice_and_generation(harness, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=task_dir, include_defaults=False)
    results = simple_evaluate(
        model=harness, tasks=["bd3lm_toy_mc", "bd3lm_toy_gen"], task_manager=manager,
        bootstrap_iters=0,
    )  # fmt: skip
    mc = results["results"]["bd3lm_toy_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0
    assert "exact_match,none" in results["results"]["bd3lm_toy_gen"]


@pytest.mark.e2e
def test_spread_shrinks_with_mc_samples(harness):
    ctx, cont = harness._split("The king said", " to the queen and the lords of the land")
    ids, start = harness._sequence(ctx, cont)

    def spread(m):
        harness.mc_samples = m
        values = [harness.score(ids, start, torch.Generator().manual_seed(s))[0] for s in range(8)]
        return torch.tensor(values).std().item()

    try:
        assert spread(16) < spread(1)
    finally:
        harness.mc_samples = 4


@pytest.mark.e2e
def test_interval_at_one_is_deterministic(harness):
    """With the interval at t = 1 (K = 1's evaluation interval, where it is the exact NLL)
    every continuation token is masked: the estimate no longer depends on the draw."""
    ctx, cont = harness._split("To be, or", " not to be")
    ids, start = harness._sequence(ctx, cont)
    saved = harness.interval
    harness.interval = (1.0, 1.0)
    try:
        a = harness.score(ids, start, torch.Generator().manual_seed(0))
        b = harness.score(ids, start, torch.Generator().manual_seed(1))
        assert a[0] == pytest.approx(b[0]) and a[0] < 0
        assert torch.allclose(a[2], a[2][0])
    finally:
        harness.interval = saved
