"""The objective contract (algorithms.base.Objective, Capabilities): every objective implements
it, declares what it supports in one record, takes its loss flags by keyword, and shares the
text8-crop step and the masking forward process, which give exactly what each objective's own
copy computed before they were shared (re-derived here step by step)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from algorithms.ar import Autoregressive, ar_log_probs
from algorithms.base import (
    SAMPLER_OPTIONS,
    Capabilities,
    DoubleLengthCrop,
    Objective,
    Shard,
    q_xt,
    sample_t,
    sigma_from_p,
    subs_log_probs,
)
from algorithms.masked_diffusion import MaskedDiffusion
from algorithms.sedd import SEDD
from algorithms.ssdlm import SSDLM
from models.network import BackboneNetwork
from noise_schedule import LogLinear

V, MASK, L = 37, 36, 16
EPS = (torch.tensor(1e-3), torch.tensor(1.0))
CROP = DoubleLengthCrop(bos_id=1, eos_id=2, insert_special=True)


def md(cross_attn=True, K=4, time_conditioning=False, **kw):
    return MaskedDiffusion(
        LogLinear(), MASK, L, K if cross_attn else L, cross_attn=cross_attn, ignore_bos=True,
        time_conditioning=time_conditioning, antithetic=True, **kw,
    )  # fmt: skip


def sedd(**kw):
    return SEDD(noise=LogLinear(), mask_id=MASK, seq_len=L, **kw)


OBJECTIVES = {
    "ar": lambda: Autoregressive(mask_id=MASK, seq_len=L),
    "bd3lm": md,
    "bd3lm_time": lambda: md(time_conditioning=True),
    "mdlm": lambda: md(cross_attn=False),
    "sedd": sedd,
    "ssdlm": lambda: SSDLM(block_size=4),
}

# kv_cache, prompts, ppl_eval, clip_interval, two_stream, time_conditioned, reencodes_window
TABLE = {
    "ar": (True, True, True, False, False, False, False),
    "bd3lm": (True, True, True, True, True, False, False),
    "bd3lm_time": (False, True, True, True, True, True, False),
    "mdlm": (False, False, True, True, False, False, True),
    "sedd": (False, False, True, True, False, True, True),
    "ssdlm": (False, False, False, False, False, True, False),
}
READS = {
    "ar": {"var_length", "reject_low_entropy", "nucleus_p", "reencode_context"},
    "bd3lm": set(SAMPLER_OPTIONS),
    "bd3lm_time": set(SAMPLER_OPTIONS),
    "mdlm": set(SAMPLER_OPTIONS),
    "sedd": {"var_length", "reject_low_entropy", "nucleus_p"},
    "ssdlm": {"reject_low_entropy"},
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_capabilities_are_the_table(name):
    objective = OBJECTIVES[name]()
    caps = objective.capabilities
    assert isinstance(objective, Objective) and isinstance(caps, Capabilities)
    flags = (caps.kv_cache, caps.prompts, caps.ppl_eval, caps.clip_interval, caps.two_stream,
             caps.time_conditioned, caps.reencodes_window)  # fmt: skip
    assert flags == TABLE[name]
    assert caps.sampling_keys.reads == READS[name]
    # the names settings/, sampling/ and hf/ still read agree with the record
    assert objective.supports_kv_cache == caps.kv_cache
    assert objective.supports_prompts == caps.prompts
    assert objective.sampling_keys is caps.sampling_keys
    with pytest.raises(AttributeError):
        caps.kv_cache = not caps.kv_cache  # frozen


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_flags_are_keyword_only(name):
    objective = OBJECTIVES[name]()
    params = inspect.signature(objective.loss).parameters
    assert [params[k].kind for k in ("train", "generator", "shard")] == [
        inspect.Parameter.KEYWORD_ONLY
    ] * 3
    x0 = torch.zeros(2, L, dtype=torch.long)
    with pytest.raises(TypeError, match="positional"):
        objective.loss(None, x0, torch.ones(2, L), *EPS, True)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_ppl_eval_capability_is_whether_there_is_a_bound(name):
    objective = OBJECTIVES[name]()
    if objective.capabilities.ppl_eval:
        lo, hi = objective.eval_interval()
        assert 0 < lo <= hi <= 1
    else:
        with pytest.raises(NotImplementedError, match="ppl_eval"):
            objective.eval_interval()


def test_check_rows_is_a_no_op_except_for_ssdlm():
    for name in ("ar", "bd3lm", "mdlm", "sedd"):
        assert OBJECTIVES[name]().check_rows(2) is None
    with pytest.raises(ValueError, match="no context"):
        SSDLM(block_size=4).check_rows(4)


def old_masked_corrupt(algo, x0, eps_min, eps_max, generator, shard=None):
    """MaskedDiffusion.corrupt as each objective carried it before the shared forward process:
    x_t, loss_scale (-1 in NLL mode, MDLM's continuous-time weight with mdlm_loss_scale), sigma."""
    t = sample_t(x0.shape[0], L, algo.block_size, eps_min, eps_max, algo.antithetic, x0.device,
                 generator, shard)  # fmt: skip
    loss_scale, move_chance = algo.noise(t)
    sigma = sigma_from_p(move_chance[:, 0:1], algo.noise.sigma_max)
    if algo.mdlm_loss_scale:
        sigma = algo.noise.total_noise(t)
        move_chance = 1 - torch.exp(-sigma)
        loss_scale = -algo.noise.rate_noise(t) / torch.expm1(sigma)
    xt = q_xt(x0, move_chance, MASK, algo.block_size, eps_min, eps_max, algo.resample,
              generator, shard)  # fmt: skip
    if eps_min > 0.5:
        loss_scale = -torch.ones_like(loss_scale)
    if algo.ignore_bos:
        xt[:, 0] = x0[:, 0]
    return xt, loss_scale, sigma


def old_sedd_corrupt(algo, x0, eps_min, eps_max, generator):
    """SEDD.corrupt before the shared forward process: x_t, dsigma, sigma."""
    t = sample_t(x0.shape[0], L, L, eps_min, eps_max, algo.antithetic, x0.device, generator)
    loss_scale, move_chance = algo.noise(t)
    sigma = sigma_from_p(move_chance[:, 0:1], algo.noise.sigma_max)
    dsigma = -loss_scale * torch.expm1(sigma)
    if algo.mdlm_loss_scale:
        sigma, dsigma = algo.noise.total_noise(t), algo.noise.rate_noise(t)
        move_chance = 1 - torch.exp(-sigma)
    xt = q_xt(x0, move_chance, MASK, L, eps_min, eps_max, algo.resample, generator)
    if algo.ignore_bos:
        xt[:, 0] = x0[:, 0]
    return xt, dsigma, sigma


def rows(seed=0, B=6):
    return torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(seed))


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize(
    "kw, eps",
    [
        ({}, EPS),
        ({"mdlm_loss_scale": True}, EPS),
        ({"resample": True}, (torch.tensor(0.3), torch.tensor(0.8))),
        ({"K": 1}, (torch.tensor(1.0), torch.tensor(1.0))),  # NLL mode
        ({"cross_attn": False, "mdlm_loss_scale": True}, EPS),
    ],
)
def test_masked_diffusion_corruption_is_the_per_objective_code(kw, eps):
    algo, x0 = md(**kw), rows()
    got = algo.corrupt(x0, *eps, torch.Generator().manual_seed(3))
    want = old_masked_corrupt(algo, x0, *eps, torch.Generator().manual_seed(3))
    assert_same(got, want)
    shard = Shard.interleaved(3, rank=1, world=2, device="cpu")
    got = algo.corrupt(x0[:3], *eps, torch.Generator().manual_seed(4), shard)
    want = old_masked_corrupt(algo, x0[:3], *eps, torch.Generator().manual_seed(4), shard)
    assert_same(got, want)


@pytest.mark.parametrize("kw", [{}, {"mdlm_loss_scale": True}, {"ignore_bos": False}])
def test_sedd_corruption_is_the_per_objective_code(kw):
    algo, x0 = sedd(**kw), rows(1)
    got = algo.corrupt(x0, *EPS, torch.Generator().manual_seed(5))
    assert_same(got, old_sedd_corrupt(algo, x0, *EPS, torch.Generator().manual_seed(5)))


def test_mdlm_and_sedd_draw_the_same_xt_and_sigma():
    """One forward process: with K = L, equal seeds give MDLM and SEDD the same x_t and sigma;
    SEDD's weight is dsigma = -loss_scale * expm1(sigma) of MDLM's loss_scale = -1/t."""
    x0 = rows(2)
    xt_m, scale, sigma_m = md(cross_attn=False).corrupt(x0, *EPS, torch.Generator().manual_seed(6))
    xt_s, dsigma, sigma_s = sedd().corrupt(x0, *EPS, torch.Generator().manual_seed(6))
    assert (xt_m == MASK).any() and (xt_m != MASK).any()
    assert torch.equal(xt_m, xt_s) and torch.equal(sigma_m, sigma_s)
    assert torch.equal(dsigma, -scale * torch.expm1(sigma_m))


def network(tiny_dit, causal=False):
    return BackboneNetwork(tiny_dit(causal=causal))


@pytest.mark.parametrize("name", ["bd3lm", "mdlm", "sedd"])
def test_crop_then_loss_equals_the_loss_of_the_cropped_window(name, tiny_dit):
    """The shared crop step: rows of 2L are cut by DoubleLengthCrop with the loss's generator
    (one draw, before the forward process), then the window's loss is computed as for rows
    of L; rows of L are never cropped."""
    plain = OBJECTIVES[name]()
    cropped = dataclasses.replace(plain, crop=CROP)
    net = network(tiny_dit)
    x, mask = rows(3, B=2).repeat(1, 2), torch.ones(2, 2 * L)
    mask[1, -5:] = 0
    with torch.no_grad():
        got = cropped.loss(
            net, x, mask, *EPS, train=True, generator=torch.Generator().manual_seed(7)
        )
        gen = torch.Generator().manual_seed(7)
        inputs, _, window_mask = CROP(x, mask, L, gen)
        want = plain.loss(net, inputs, window_mask, *EPS, train=True, generator=gen)
        same_rows = cropped.loss(net, x[:, :L], mask[:, :L], *EPS, train=True,
                                 generator=torch.Generator().manual_seed(8))  # fmt: skip
        plain_rows = plain.loss(net, x[:, :L], mask[:, :L], *EPS, train=True,
                                generator=torch.Generator().manual_seed(8))  # fmt: skip
    assert_same((got.loss, got.nlls, got.token_mask), (want.loss, want.nlls, want.token_mask))
    assert torch.equal(same_rows.nlls, plain_rows.nlls)


def test_ar_crop_predicts_the_window_shifted_by_one(tiny_dit):
    """AR with the crop: input the window (BOS first), target the window shifted by one (EOS
    last), weights the window's attention mask; the sum is re-derived from the logits."""
    ar = Autoregressive(mask_id=MASK, seq_len=L, crop=CROP)
    net = network(tiny_dit, causal=True)
    x, mask = rows(4, B=2).repeat(1, 2), torch.ones(2, 2 * L)
    mask[0, :20] = 0
    with torch.no_grad():
        got = ar.loss(net, x, mask, *EPS, train=False, generator=torch.Generator().manual_seed(9))
        inputs, target, weights = CROP(x, mask, L, torch.Generator().manual_seed(9))
        log_p = ar_log_probs(net(inputs, None, ar.train_layout), MASK)
    nll = -log_p.gather(-1, target[..., None])[..., 0] * weights
    assert torch.equal(got.token_mask, weights)
    torch.testing.assert_close(got.nlls, nll, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.loss, nll.sum() / weights.sum(), rtol=0, atol=1e-6)


def test_log_probs_are_next_token_for_ar_and_subs_for_masked_diffusion():
    logits = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(10))
    x_last = torch.tensor([[3, MASK, 4, MASK, MASK], [MASK, 0, MASK, 7, MASK]])
    ar = OBJECTIVES["ar"]().log_probs(logits, x_last)
    subs = OBJECTIVES["bd3lm"]().log_probs(logits, x_last)
    assert torch.equal(ar, ar_log_probs(logits, MASK))
    assert torch.equal(subs, subs_log_probs(logits, x_last, MASK))
    masked = x_last == MASK
    # at masked positions both are the softmax over the tokens but the mask (float rounding)
    torch.testing.assert_close(ar[masked][:, :MASK], subs[masked][:, :MASK], rtol=0, atol=1e-5)
    clean = subs[~masked].argmax(-1)
    assert torch.equal(clean, x_last[~masked]) and (subs[~masked].max(-1).values == 0).all()
    assert (ar[~masked].max(-1).values < 0).all()  # AR reads no x_last: no one-hot rows
    for name in ("sedd", "ssdlm"):
        with pytest.raises(NotImplementedError, match="log-probabilities"):
            OBJECTIVES[name]().log_probs(logits, x_last)
