"""Sampling: the KV cache against from-scratch recomputation at every step, within
and beyond the window, with prompts of different lengths; stop rules; Gen-PPL windows."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

import sampling
import settings
from conftest import (
    BOS_TINY,
    MASK_TINY,
    ROOT,
    V_TINY,
    module_denoiser,
    sample_with,
    sampler_cfg,
    tiny_module,
)
from metrics import sliding_windows
from sampling import stops

V, MASK, BOS = V_TINY, MASK_TINY, BOS_TINY
run = sample_with


@pytest.mark.parametrize("fuse_commit", [True, False])
@pytest.mark.parametrize("first_hitting", [True, False])
@pytest.mark.parametrize("length", [16, 40])  # within the 16-token window, and 2.5x beyond it
def test_bd3lm_cache_equals_recomputation_at_every_step(length, first_hitting, fuse_commit):
    """Fused commits (each block committed inside the next block's first call) and separate
    commit passes both give the uncached logits at every step."""
    module = tiny_module("bd3lm")
    cfg = sampler_cfg(length, 4, first_hitting=first_hitting, nucleus_p=0.95)
    cfg = dataclasses.replace(cfg, fuse_commit=fuse_commit)
    with torch.no_grad():
        cached, cached_calls = run(module, cfg, cached=True)
        fresh, fresh_calls = run(module, cfg, cached=False)
    assert len(cached_calls) == len(fresh_calls) > length // 4
    for a, b in zip(cached_calls, fresh_calls, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.tokens, fresh.tokens)
    assert not (cached.tokens == MASK).any()
    commit_passes = 0 if fuse_commit else length // 4 - 1
    assert (cached.nfe_total - cached.nfe_denoise == commit_passes).all()


def test_time_conditioned_bd3lm_refuses_the_cache_and_samples_without_it():
    """Training conditions [x_t ; x_0] on the block's t and uncached sampling re-encodes the
    context at each step's t: a cache of keys computed once cannot reproduce that, so the cache
    is refused (one line at the config boundary, ValueError below it) and sampling without it
    runs."""
    from utils import UserError

    module = tiny_module("bd3lm", 16, "algo.time_conditioning=true")
    with pytest.raises(ValueError, match="kv_cache=true needs algo.time_conditioning=false"):
        module_denoiser(module, 16).new_cache(2, 4)
    cfg = sampler_cfg(40, 4)
    with torch.no_grad():
        out, calls = run(module, cfg, cached=False)
    assert not (out.tokens == MASK).any() and len(calls) == 39
    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base=None):
        run_cfg = compose("config", overrides=["experiment=smoke", "mode=sample_eval",
                          "algo.time_conditioning=true", "sampling.kv_cache=true",
                          "checkpointing.save_dir=/tmp/x"])  # fmt: skip
    with pytest.raises(UserError, match="sampling.kv_cache=true: .*time_conditioning=[Tt]rue"):
        settings.validate(run_cfg, settings.resolve_hardware(run_cfg.trainer))


def test_ar_cache_equals_recomputation_beyond_the_window():
    module = tiny_module("ar")
    cfg = sampler_cfg(30, 1)
    with torch.no_grad():
        cached, cached_calls = run(module, cfg, cached=True)
        fresh, fresh_calls = run(module, cfg, cached=False)
    for a, b in zip(cached_calls, fresh_calls, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.tokens, fresh.tokens) and cached.tokens.shape == (3, 30)
    assert (cached.nfe_denoise == 29).all()


def test_reencode_option_equals_the_exact_path_within_the_window():
    module = tiny_module("bd3lm")
    cfg = sampler_cfg(16, 4)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    with torch.no_grad():
        exact = sampling.semi_ar_sample(module_denoiser(module, 16), 2, cfg, gen(), "cpu")
        reref = sampling.semi_ar_sample(module_denoiser(module, 16, True), 2, cfg, gen(), "cpu")
    assert torch.equal(exact.tokens, reref.tokens)


@pytest.mark.parametrize("algo,block", [("bd3lm", 4), ("ar", 1)])
def test_prompts_of_different_lengths_cache_equals_recomputation(algo, block):
    from types import SimpleNamespace

    from sampling.generate import encode_prompts

    class Tok:  # "words" are single ids
        def encode(self, text, add_special_tokens=False):
            return [int(w) for w in text.split()]

    vocab = SimpleNamespace(bos_id=BOS, tokenizer=Tok())
    prompts = ["5 6 7 8 9 10", "11", "12 13 14"]
    tokens, valid = encode_prompts(prompts, vocab, block, 16)
    assert tokens.shape[1] % block == 0 and valid.sum(-1).tolist() == [7, 2, 4]
    module = tiny_module(algo)
    cfg = sampler_cfg(16 if block == 4 else 12, block)
    with torch.no_grad():
        cached, calls_c = run(module, cfg, True, tokens, valid)
        fresh, calls_f = run(module, cfg, False, tokens, valid)
    for a, b in zip(calls_c, calls_f, strict=True):  # float noise here is ~2e-6; padding
        torch.testing.assert_close(a, b, rtol=0, atol=5e-6)  # seen by real tokens: ~3e-5
    assert torch.equal(cached.tokens, fresh.tokens)
    for row, prompt in enumerate(prompts):
        start = int(cached.prompt_pad[row])
        ids = cached.tokens[row, start : int(cached.lengths[row])].tolist()
        assert ids[: 1 + len(prompt.split())] == [BOS] + [int(w) for w in prompt.split()]
        assert len(ids) == 1 + len(prompt.split()) + cfg.length  # no padding leaks out


def test_stop_rules_per_sequence():
    cfg = sampler_cfg(600, 4, var_length=True)
    eos = BOS
    x = torch.randint(1, 1000, (3, 300), generator=torch.Generator().manual_seed(0))  # H ~ 5.4
    x[:, 0] = BOS
    x[0, 120] = eos  # row 0 ends at its first generated EOS (kept)
    x[1, -256:] = 7  # row 1: the last 256 tokens have zero entropy
    state = stops.SequenceState(
        torch.ones(3, dtype=torch.bool), torch.full((3,), 600), ["length"] * 3
    )
    stops.apply_stop_rules(x, 0, 0, state, cfg)
    assert state.lengths.tolist() == [121, 300 - 256, 600]
    assert state.reasons == ["eos", "low_entropy", "length"]
    assert state.active.tolist() == [False, False, True]
    fixed = sampler_cfg(600, 4, reject_low_entropy=True)
    state = stops.SequenceState(
        torch.ones(3, dtype=torch.bool), torch.full((3,), 600), ["length"] * 3
    )
    stops.apply_stop_rules(x, 0, 0, state, fixed)
    assert state.reasons == ["length", "rejected_low_entropy", "length"]


def test_generative_perplexity_windows_cover_each_position_once():
    spans = sliding_windows(2048, 1024, 512)
    assert len(spans) == 3
    scored = [p for start, end, first in spans for p in range(max(start + 1, first), end)]
    assert sorted(scored) == list(range(1, 2048))
    assert sliding_windows(100, 1024, 512) == [(0, 100, 1)]
