"""Masks against a brute-force reading of their definitions; backends against each other."""

from __future__ import annotations

import pytest
import torch

from models.attention import (
    AttentionMask,
    BandedBlockCausalMask,
    BlockCausalMask,
    BlockDiffusionMask,
    CausalMask,
    MaskCache,
    attend,
    dense_mask,
)


def brute_force_bd3_mask(L: int, K: int) -> torch.Tensor:
    """The block-diffusion mask of paper Sec. 3.2 read literally, one (q, k) pair at a time."""
    out = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_half, k_half = q >= L, k >= L
            q_block = (q - L if q_half else q) // K
            k_block = (k - L if k_half else k) // K
            diagonal = q_half == k_half and q_block == k_block
            offset_causal = (not q_half) and k_half and k_block < q_block
            causal = q_half and k_half and k_block <= q_block
            out[q, k] = diagonal or offset_causal or causal
    return out


@pytest.mark.parametrize("L,K", [(4, 2), (8, 1), (8, 8), (12, 3), (16, 4), (6, 6), (10, 5)])
def test_block_diffusion_mask_matches_definition(L, K):
    mask = dense_mask(BlockDiffusionMask(L, K), 2 * L, 2 * L)
    assert torch.equal(mask, brute_force_bd3_mask(L, K))
    assert mask.any(dim=1).all(), "every query needs a key (no NaN rows)"
    assert not mask[L:, :L].any(), "x0 never attends to x_t"


def test_block_diffusion_mask_worked_example():
    rows = ["11000000"] * 2 + ["00111100"] * 2 + ["00001100"] * 2 + ["00001111"] * 2
    expected = torch.tensor([[c == "1" for c in r] for r in rows])
    assert torch.equal(dense_mask(BlockDiffusionMask(4, 2), 8, 8), expected)


def test_block_causal_is_the_x0_part_of_the_training_mask():
    L, K = 12, 3
    full = dense_mask(BlockDiffusionMask(L, K), 2 * L, 2 * L)
    assert torch.equal(dense_mask(BlockCausalMask(K), L, L), full[L:, L:])
    assert torch.equal(dense_mask(CausalMask(), L, L), torch.ones(L, L).tril().bool())


def test_mask_cache_builds_once():
    cache = MaskCache("sdpa")
    a = cache.get(BlockDiffusionMask(8, 2), 16, 16, torch.device("cpu"))
    b = cache.get(BlockDiffusionMask(8, 2), 16, 16, torch.device("cpu"))
    assert a is b and a.dense.shape == (16, 16)
    assert cache.get(CausalMask(), 5, 5, torch.device("cpu")).causal
    assert cache.get(None, 5, 5, torch.device("cpu")).dense is None


def test_sdpa_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen) for _ in range(3))
    mask = dense_mask(BlockDiffusionMask(8, 2), 16, 16)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    out = attend(q, k, v, AttentionMask(dense=mask), "sdpa")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L,K", [(16, 4), (24, 8)])
def test_flex_matches_sdpa_forward_on_cpu(tiny_dit, L, K):
    """The same DiT weights under sdpa and flex (eager, forward only on CPU)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    sdpa_model = tiny_dit(backend="sdpa")
    flex_model = tiny_dit(backend="flex")
    flex_model.load_state_dict(sdpa_model.state_dict())
    x = torch.randint(0, 36, (2, 2 * L), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(L).repeat(2)
    sigma = torch.zeros(2)
    predicate = BlockDiffusionMask(L, K)

    def masks(backend):
        return MaskCache(backend).get(predicate, 2 * L, 2 * L, "cpu")

    with torch.no_grad():
        ref = sdpa_model(x, positions=positions, mask=masks("sdpa"), sigma=sigma)
        out = flex_model(x, positions=positions, mask=masks("flex"), sigma=sigma)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "predicate,S",
    [
        (BlockCausalMask(4), 24),
        (BandedBlockCausalMask(4, 2), 24),
        (BandedBlockCausalMask(3, 3), 27),
    ],
)
def test_flex_matches_sdpa_for_the_sampling_masks(predicate, S):
    """The uncached sampling masks (block-causal, and banded beyond the window) under flex
    (eager, forward only on CPU) and under SDPA over the dense mask."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, S, 8, generator=gen) for _ in range(3))
    dense = MaskCache("sdpa").get(predicate, S, S, torch.device("cpu"))
    flex = MaskCache("flex").get(predicate, S, S, torch.device("cpu"))
    assert flex.block_mask is not None and dense.dense is not None
    torch.testing.assert_close(
        attend(q, k, v, flex, "flex"), attend(q, k, v, dense, "sdpa"), rtol=1e-5, atol=1e-6
    )


def test_flex_model_cached_sampling_equals_its_uncached_flex_sampling(tiny_dit):
    """A flex model samples without a cache through flex block masks and with the cache
    through SDPA inside the cache: the same log-probabilities at every call, within and beyond
    the window."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import sampling
    from algorithms.masked_diffusion import MaskedDiffusion
    from noise_schedule import LogLinear
    from sampling import ModelDenoiser

    model = tiny_dit(vocab_size=37, backend="flex")
    algorithm = MaskedDiffusion(
        LogLinear(), mask_id=36, seq_len=16, block_size=4, cross_attn=True, ignore_bos=True,
        time_conditioning=False, antithetic=True,
    )  # fmt: skip
    cfg = sampling.SamplerConfig(
        length=32, block_size=4, num_steps=4, context=16, bos_id=0, mask_id=36, eos_id=0,
        reject_low_entropy=False,
    )  # fmt: skip
    calls = {True: [], False: []}
    for cached in (True, False):
        sampling_model = ModelDenoiser(model, algorithm, window=16)
        original = sampling_model.logprobs

        def logprobs(*args, _orig=original, _out=calls[cached], **kwargs):
            _out.append(_orig(*args, **kwargs))
            return _out[-1]

        sampling_model.logprobs = logprobs
        run_cfg = sampling.SamplerConfig(**{**cfg.__dict__, "kv_cache": cached})
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            sampling.semi_ar_sample(sampling_model, 2, run_cfg, gen, torch.device("cpu"))
    assert len(calls[True]) == len(calls[False]) > 8
    for a, b in zip(calls[True], calls[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
