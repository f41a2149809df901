"""The clip-interval grid and selection, the mdlm_loss_scale path, and the
sampler building blocks (nucleus quirk, categorical draws, per-sequence first-hitting)."""

from __future__ import annotations

import pytest
import torch

from algorithms.clip_search import (
    VarianceRecorder,
    interval_grid,
    per_block_means,
    select_interval,
)
from algorithms.masked_diffusion import MaskedDiffusion
from conftest import P_VALUE, chi_square_p
from noise_schedule import LogLinear
from sampling import SamplerConfig, semi_ar_sample
from sampling.draws import nucleus, sample_categorical


def test_grid_has_36_keys_with_float32_starts():
    grid = interval_grid([0.5, 0.6, 0.7, 0.8, 0.9], 0.05, block_size=4)
    assert len(grid) == 36 and grid[0] == (1e-3, 1.0)
    f32_eps = torch.tensor(1e-3, dtype=torch.float32).item()
    assert f32_eps != 1e-3
    starts_at_zero = [k for k in grid[1:] if k[0] == f32_eps]
    assert [round(k[1], 6) for k in starts_at_zero] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert all(high <= 1.0 for _, high in grid) and max(low for low, _ in grid) == 0.5
    assert interval_grid([], 0.05, block_size=4) == [(1e-3, 1.0)]
    assert interval_grid([0.5], 0.05, block_size=1) == [(1e-3, 1.0), (1.0, 1.0)]


def test_selection_picks_the_least_variance_and_first_on_ties():
    grid = [(1e-3, 1.0), (0.3, 0.8), (0.5, 1.0)]
    recorder = VarianceRecorder(grid, max_batches=2)
    gen = torch.Generator().manual_seed(0)
    spreads = {grid[0]: 3.0, grid[1]: 0.5, grid[2]: 1.0}
    for _ in range(3):
        for key, spread in spreads.items():
            if recorder.wants(key):
                recorder.add(key, torch.randn(64, 4, generator=gen) * spread)
    assert all(len(v) == 2 for v in recorder.samples.values())
    scores = recorder.scores(lambda t: t)
    assert select_interval(scores) == (0.3, 0.8)
    assert scores[grid[0]] == pytest.approx(9.0, rel=0.3)
    assert select_interval({grid[0]: 1.0, grid[1]: 1.0}) == grid[0]


def test_per_block_means():
    nlls = torch.arange(8.0).view(1, 8)
    assert torch.equal(per_block_means(nlls, 4), torch.tensor([[1.5, 5.5]]))


def test_mdlm_loss_scale_is_the_same_weight_by_another_path():
    algo = MaskedDiffusion(LogLinear(), 9, 8, 8, False, True, False, True, mdlm_loss_scale=True)
    x0 = torch.randint(0, 9, (16, 8), generator=torch.Generator().manual_seed(0))
    eps = torch.tensor(1e-3), torch.tensor(1.0)
    gen = torch.Generator().manual_seed(1)
    xt, loss_scale, sigma = algo.corrupt(x0, *eps, gen)
    t = -1 / loss_scale
    torch.testing.assert_close(sigma, -torch.log1p(-(1 - 1e-3) * t), rtol=1e-4, atol=1e-5)


def test_nucleus_drops_the_token_that_crosses_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    kept = nucleus(probs, 0.85)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(nucleus(probs, 0.1), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64))
    assert nucleus(probs, 1.0) is probs


def test_categorical_matches_its_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64).expand(20_000, 3)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=3)
    assert chi_square_p(counts, probs[0] * 20_000) > P_VALUE


class FakeModel:
    """A ModelDenoiser whose denoiser predicts `token` everywhere (or uniform if None)."""

    def __init__(self, V, mask_id, token=None):
        self.V, self.mask_id, self.token, self.calls = V, mask_id, token, []

    def logprobs(
        self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False, rows=None
    ):
        self.calls.append((x[:, -num_last:] == self.mask_id).sum(-1).tolist())
        logits = torch.zeros(x.shape[0], num_last if rows is None else rows.shape[1], self.V)
        if self.token is not None:
            logits.fill_(-1e6)
            logits[..., self.token] = 0.0
        logits[..., self.mask_id] = -1e6
        return torch.log_softmax(logits, -1)


def test_first_hitting_is_per_sequence_and_deterministic():
    """Every sequence of the batch unmasks exactly one position per model call and ends fully
    unmasked; NFE per sequence = L - 1 (the BOS is given)."""
    model = FakeModel(6, 5, token=3)
    cfg = SamplerConfig(12, 4, 50, 12, bos_id=0, mask_id=5, eos_id=0, reject_low_entropy=False)
    out = semi_ar_sample(model, 4, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert out.tokens.shape == (4, 12) and (out.tokens[:, 0] == 0).all()
    assert (out.tokens[:, 1:] == 3).all() and out.nfe_denoise.tolist() == [11] * 4
    # within a block the masked count drops by exactly one per call, for every sequence
    assert model.calls[:3] == [[3] * 4, [2] * 4, [1] * 4]  # first block: BOS given
    assert model.calls[3:7] == [[4] * 4, [3] * 4, [2] * 4, [1] * 4]
    again = semi_ar_sample(model, 4, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(again.tokens, out.tokens)


def test_ddpm_sampler_unmasks_everything_by_the_last_step():
    cfg = SamplerConfig(12, 4, 3, 12, 0, 5, 0, first_hitting=False, reject_low_entropy=False)
    model = FakeModel(6, 5)
    out = semi_ar_sample(model, 3, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert not (out.tokens == 5).any()
    assert (out.nfe_denoise <= 9).all() and (out.nfe_denoise >= 3).all()
