"""The variance-minimising clipped schedule (paper Secs. 5.2-5.3): candidate intervals [beta,
omega] for t, the per-block NELBO samples measured for each during validation, and the selection.

The grid and its float32 rounding follow the reference: keys are Python floats converted from
float32 values (e.g. 0.0010000000474974513), except the literal (1e-3, 1.0) that validation
reports, which therefore never collides with a grid key.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from algorithms.base import DEFAULT_EPS_MAX, DEFAULT_EPS_MIN

Interval = tuple[float, float]


def interval_grid(widths: list[float], delta: float, block_size: int) -> list[Interval]:
    """K > 1: (1e-3, 1) then, per width w, (max(i, 1e-3), max(i + w, 1e-3)) for i in
    arange(0, 1 - w + delta, delta) in float32. K = 1: (1e-3, 1) and (1, 1)."""
    grid: list[Interval] = [(DEFAULT_EPS_MIN, DEFAULT_EPS_MAX)]
    if block_size == 1:
        return [*grid, (1.0, 1.0)]
    floor = torch.tensor(DEFAULT_EPS_MIN, dtype=torch.float32)
    for width in widths:
        for start in torch.arange(0, 1 - width + delta, delta, dtype=torch.float32):
            low = torch.maximum(start, floor).item()
            high = torch.maximum(start + width, floor).item()
            grid.append((low, high))
    return grid


def per_block_means(nlls: Tensor, block_size: int) -> Tensor:
    """(B, L) per-token NELBO terms -> (B, L / K) block means: one sample per block."""
    B, L = nlls.shape
    return nlls.detach().view(B, L // block_size, block_size).mean(-1)


class VarianceRecorder:
    """Per-interval lists of (B, nb) per-block loss samples with their rows' (B,) real flags
    (False: rows that pad the ranks), at most `max_batches` each."""

    def __init__(self, grid: list[Interval], max_batches: int):
        self.grid = grid
        self.max_batches = max_batches
        self.samples: dict[Interval, list[tuple[Tensor, Tensor]]] = {key: [] for key in grid}

    def wants(self, key: Interval) -> bool:
        return len(self.samples[key]) < self.max_batches

    def add(self, key: Interval, block_means: Tensor, real: Tensor | None = None) -> None:
        if real is None:
            real = torch.ones(block_means.shape[0], dtype=torch.bool, device=block_means.device)
        self.samples[key].append((block_means, real))

    def scores(self, gather: Callable[[Tensor], Tensor]) -> dict[Interval, float]:
        """Mean over recorded batches of the unbiased variance of the batch's samples gathered
        from every rank (padding rows left out); intervals with no samples are left out."""
        scores = {}
        for key, batches in self.samples.items():
            if batches:
                total = 0.0
                for means, real in batches:
                    values = gather(means).reshape(-1, means.shape[-1])
                    keep = gather(real.float()).reshape(-1) > 0.5
                    total += values[keep].flatten().double().var().item()
                scores[key] = total / len(batches)
        return scores


def select_interval(scores: dict[Interval, float]) -> Interval:
    """The interval with the smallest variance; the first one (grid order) wins ties."""
    return min(scores, key=lambda key: scores[key])
