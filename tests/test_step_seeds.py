"""The per-micro-batch seeds (Diffusion.step_key, diffusion.dropout_seed, Diffusion.eval_key)
are seeds torch takes for every run seed the schema accepts (0 .. 2**32 - 1), distinct over
(step, micro-batch, rank), and unchanged wherever the old formula fitted (published runs
resume bit-identically)."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import run_inprocess
from diffusion import TORCH_SEEDS, Diffusion, dropout_seed

SEEDS = (0, 7, 4_000_000, 20250101, 2**32 - 1)


def keys(seed: int, step: int, micro: int, accumulate: int = 4) -> tuple[int, int]:
    """(step_key, eval_key) of a module with run seed `seed` at optimizer step `step`."""
    trainer = types.SimpleNamespace(accumulate_grad_batches=accumulate)
    module = types.SimpleNamespace(seed=seed, global_step=step, _trainer=trainer, trainer=trainer)
    return Diffusion.step_key(module, micro), Diffusion.eval_key(module, micro, draw=3)


def test_seeds_fit_torch_and_do_not_collide():
    for seed in SEEDS:
        seen = set()
        for step in (*range(50), 10**6, 10**8):
            for micro in range(4):
                step_key, eval_key = keys(seed, step, micro)
                assert 0 <= step_key < 2**63 - 1 and 0 <= eval_key < 2**63 - 1
                for rank in range(8):
                    value = dropout_seed(step_key, rank)
                    assert 0 <= value < TORCH_SEEDS
                    seen.add(value)
                torch.Generator().manual_seed(eval_key + 7)  # + rank: still a torch seed
        assert len(seen) == 52 * 4 * 8, f"seed {seed}: (step, micro, rank) seeds collide"
    torch.manual_seed(dropout_seed(keys(2**32 - 1, 10**8, 3)[0], 1023))  # torch takes it


def test_seeds_that_fitted_are_unchanged():
    """Below 2**64 the derivation is the old key * 1031 + rank (run seeds under ~4.4 million)."""
    for seed in (0, 7, 4_000_000):
        step_key, _ = keys(seed, 123_456, 2)
        assert dropout_seed(step_key, 5) == step_key * 1031 + 5
    assert dropout_seed(2**62, 3) == (2**62 * 1031 + 3) % 2**64  # wraps only past 64 bits


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [20250101, 2**32 - 1])
def test_date_and_largest_seeds_train(tmp_path, data_cache, seed):
    """A date-style seed overflowed torch.manual_seed at the first training step."""
    run_inprocess(tmp_path, f"seed={seed}", "trainer.max_steps=2")
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
