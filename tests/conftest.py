"""Test setup: offline hub variables (hub look-ups otherwise stall for tens of seconds), the
repository root on sys.path, a tiny model factory shared by the numerics tests."""

from __future__ import annotations

import os
import sys

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}
os.environ.update(OFFLINE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from models.dit import DiT, DiTConfig  # noqa: E402


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised layers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture
def tiny_dit():
    """factory(vocab_size=37, causal=False, backend='sdpa', randomized=True) -> DiT in eval mode."""

    def make(vocab_size=37, causal=False, backend="sdpa", randomized=True, seed=0):
        torch.manual_seed(seed)
        config = DiTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            cond_dim=16,
            n_blocks=2,
            n_heads=4,
            dropout=0.0,
            causal=causal,
            adaln=not causal,
            attn_backend=backend,
        )
        model = DiT(config)
        if randomized:
            randomize_(model, seed)
        return model.eval()

    return make
