"""Test setup: offline hub variables (hub look-ups otherwise stall for tens of seconds), the
repository root on sys.path, the shared data cache, in-process and subprocess runs of main.py,
and a tiny model factory shared by the numerics tests."""

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

P_VALUE = 1e-6  # statistical tests fail by chance less than once in a million seeds


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """The p-value of Pearson's chi-square statistic over bins with expected counts > 0
    (df = bins - 1); bins of expected count 0 must have count 0."""
    counts, expected = counts.double().flatten(), expected.double().flatten()
    assert (counts[expected == 0] == 0).all(), "draws where the law puts no mass"
    counts, expected = counts[expected > 0], expected[expected > 0]
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), statistic / 2)
    )


def two_sample_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """The chi-square homogeneity p-value of two count vectors over the same bins."""
    a, b = a.double(), b.double()
    total = a + b
    keep = total > 0
    a, b, total = a[keep], b[keep], total[keep]
    expected_a, expected_b = total * a.sum() / total.sum(), total * b.sum() / total.sum()
    statistic = ((a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b).sum()
    df = a.numel() - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), statistic / 2)
    )


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


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One token/tokenizer cache for the session (BD3LMS_CACHE, which data.cache_dir reads);
    BD3LMS_TEST_CACHE names a persistent one (the mutation runs share it)."""
    path = os.environ.get("BD3LMS_TEST_CACHE") or str(tmp_path_factory.mktemp("data_cache"))
    os.environ["BD3LMS_CACHE"] = path
    return path


def run_inprocess(run_dir, *overrides, experiment="smoke"):
    """`main.py experiment=smoke OVERRIDES` in this process with run directory `run_dir`
    (UserError propagates). Needs the data_cache fixture."""
    import main

    run_dir = str(run_dir)
    cfg = main.compose([f"experiment={experiment}", *overrides], run_dir)
    main.run(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory, data_cache):
    """A 1-layer GPT-2 with the GPT-2 tokenizer, saved as a local judge directory."""
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel

    import dataloader

    path = tmp_path_factory.mktemp("judge")
    cfg = OmegaConf.create({"tokenizer_name_or_path": "gpt2", "cache_dir": data_cache})
    dataloader.get_vocab(cfg).tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=48, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory, data_cache):
    """last.ckpt of a 4-step BD3-LM smoke run (in process)."""
    run_dir = tmp_path_factory.mktemp("smoke_bd3lm")
    run_inprocess(run_dir, "algo=bd3lm")
    return run_dir / "checkpoints" / "last.ckpt"
