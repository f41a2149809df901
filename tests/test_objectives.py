"""The forward process, SUBS and the NELBO reductions."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.ar import Autoregressive
from algorithms.base import (
    NEG_INF,
    q_xt,
    reduce_loss,
    sample_t,
    subs_log_prob_of,
    subs_log_probs,
)
from algorithms.masked_diffusion import MaskedDiffusion
from conftest import P_VALUE, chi_square_p
from models.attention import AttentionMask, MaskCache
from models.network import BackboneNetwork
from noise_schedule import SCHEDULES, LogLinear, build_noise

V, MASK = 37, 36
F32 = torch.float32


def f32(x):
    return torch.tensor(x, dtype=F32)


def network_for(model):
    """The glue's `network` callable for a bare DiT (what Diffusion.network is)."""
    return BackboneNetwork(model)


def masked_diffusion(L, K, cross_attn=True, **kw):
    args = dict(
        noise=LogLinear(),
        mask_id=MASK,
        seq_len=L,
        block_size=K,
        cross_attn=cross_attn,
        ignore_bos=True,
        time_conditioning=False,
        antithetic=True,
    )
    args.update(kw)
    return MaskedDiffusion(**args)


def test_antithetic_t_worked_example(monkeypatch):
    """Antithetic strata: B = 2, nb = 2, all raw draws 0 -> [[0, .25], [.5, .75]] (batch-major)."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape))
    t = sample_t(2, 4, 2, f32(0.0), f32(1.0), True, torch.device("cpu"))
    assert torch.equal(t, torch.tensor([[0, 0, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75]]))


def test_sample_t_shapes_interval_and_nll_mode():
    gen = torch.Generator().manual_seed(0)
    t = sample_t(8, 16, 4, f32(0.3), f32(0.8), True, torch.device("cpu"), gen)
    assert t.shape == (8, 16) and (t >= 0.3).all() and (t <= 0.8).all()
    assert torch.equal(t.view(8, 4, 4), t.view(8, 4, 4)[..., :1].expand(8, 4, 4))
    assert sample_t(8, 16, 16, f32(1e-3), f32(1.0), True, "cpu", gen).shape == (8, 1)
    assert (sample_t(3, 4, 1, f32(1.0), f32(1.0), True, "cpu", gen) == 1).all()


def test_q_xt_masks_at_rate_t_and_resample_keeps_blocks_in_range():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (64, 32), generator=gen)
    p = torch.full((64, 1), 0.3)
    xt = q_xt(x0, p, MASK, 32, f32(1e-3), f32(1.0), False, gen)
    masked = (xt == MASK).sum()
    counts = torch.stack([masked, xt.numel() - masked])
    assert chi_square_p(counts, torch.tensor([0.3, 0.7]) * xt.numel()) > P_VALUE
    assert torch.equal(xt[xt != MASK], x0[xt != MASK])
    p = torch.rand(64, 32, generator=gen)
    xt = q_xt(x0, p, MASK, 4, f32(0.45), f32(0.8), True, gen)
    fraction = (xt.view(64, 8, 4) == MASK).float().mean(-1)
    assert ((fraction >= 0.45) & (fraction <= 0.8)).all()
    assert (q_xt(x0, p, MASK, 1, f32(1.0), f32(1.0), False, gen) == MASK).all()
    with pytest.raises(ValueError, match="resample"):
        q_xt(x0, p, MASK, 4, f32(0.3), f32(0.45), True, gen)  # no j/4 in [0.3, 0.45]


def test_subs_properties():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, V, generator=gen)
    xt = torch.randint(0, MASK, (2, 6), generator=gen)
    xt[:, ::2] = MASK
    log_p = subs_log_probs(logits, xt, MASK)
    masked = xt == MASK
    # masked rows: a distribution over the V - 1 real tokens, the mask column at ~ -1e6
    torch.testing.assert_close(log_p[masked].exp().sum(-1), torch.ones(int(masked.sum())))
    assert (log_p[masked][:, MASK] < -1e5).all()
    # unmasked rows: 0 at x_t, exactly -1e6 elsewhere
    rows = log_p[~masked]
    assert torch.equal(rows.gather(-1, xt[~masked][:, None]), torch.zeros(rows.shape[0], 1))
    assert ((rows == 0) | (rows == NEG_INF)).all() and ((rows == 0).sum(-1) == 1).all()
    # zero logits: masked positions are uniform over the V - 1 non-mask tokens
    uniform = subs_log_probs(torch.zeros(1, 1, V), torch.tensor([[MASK]]), MASK)
    torch.testing.assert_close(uniform[0, 0, :MASK].exp(), torch.full((MASK,), 1 / MASK))
    # the fused form on masked rows equals the full SUBS tensor gathered at x0
    x0 = torch.where(masked, torch.randint(0, MASK, (2, 6), generator=gen), xt)
    expected = log_p.gather(-1, x0[..., None]).squeeze(-1)[masked]
    got = subs_log_prob_of(logits[masked], x0[masked], MASK)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_reduction_counts_every_token_and_drops_bos_only_at_eval():
    nll = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    mask = torch.ones(1, 4)
    assert reduce_loss(nll, mask, ignore_bos=True, train=True).loss.item() == pytest.approx(1.5)
    assert reduce_loss(nll, mask, ignore_bos=True, train=False).loss.item() == pytest.approx(5 / 3)
    assert mask[0, 0] == 1, "the batch's attention mask is not edited in place"


def test_bd3lm_with_block_size_L_equals_mdlm(tiny_dit):
    """Same weights, same t and x_t: [x_t ; x_0] under the block-diffusion mask with K = L
    equals x_t alone under full attention (the x_0 half is never attended)."""
    L = 16
    model = tiny_dit()
    net = network_for(model)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (3, L), generator=gen)
    attn = torch.ones(3, L)
    bd3, mdlm = masked_diffusion(L, L, cross_attn=True), masked_diffusion(L, L, cross_attn=False)
    xt, scale, sigma = bd3.corrupt(x0, f32(1e-3), f32(1.0), gen)
    with torch.no_grad():
        a = bd3.nelbo(net, x0, xt, scale, sigma, attn, False)
        b = mdlm.nelbo(net, x0, xt, scale, sigma, attn, False)
    assert (xt == MASK).any()
    torch.testing.assert_close(a.nlls, b.nlls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


def test_block_size_one_at_t_one_is_ar_style_nll(tiny_dit):
    """K = 1, eps = (1, 1): every position but BOS is masked, the weight is 1, and position i
    sees the clean tokens before it: brute force runs [x0_<i ; mask] causally per position."""
    L = 8
    model = tiny_dit()
    net = network_for(model)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, MASK, (2, L), generator=gen)
    algo = masked_diffusion(L, 1)
    with torch.no_grad():
        out = algo.loss(net, x0, torch.ones(2, L), f32(1.0), f32(1.0), train=True, generator=gen)
        expected = torch.zeros(2, L)
        cache = MaskCache("sdpa")
        for i in range(1, L):
            prefix = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], dim=1)
            mask = cache.get(algo.sample_mask(L, reencode=True), i + 1, i + 1, "cpu")
            sigma, positions = torch.zeros(2), torch.arange(i + 1)
            logits = model(prefix, positions=positions, mask=mask, sigma=sigma)[:, -1]
            log_p = subs_log_probs(logits[:, None], prefix[:, -1:], MASK)[:, 0]
            expected[:, i] = -log_p.gather(-1, x0[:, i : i + 1]).squeeze(-1)
    torch.testing.assert_close(out.nlls, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.sum() / (2 * L), rtol=1e-5, atol=1e-6)


def test_ar_loss_is_next_token_nll_over_prefixes(tiny_dit):
    """Brute force: position i's loss is -log p(x_{i+1}) from the network run on the prefix
    x_{<=i} alone (an explicit lower-triangular mask), the mask token excluded."""
    model = tiny_dit(causal=True)
    net = network_for(model)
    x0 = torch.randint(0, MASK, (2, 9), generator=torch.Generator().manual_seed(2))
    ar = Autoregressive(mask_id=MASK, seq_len=9)
    with torch.no_grad():
        out = ar.loss(net, x0, torch.ones(2, 9), f32(1.0), f32(1.0), train=True)
        expected = torch.zeros(2, 8)
        for i in range(8):
            tril = AttentionMask(dense=torch.ones(i + 1, i + 1).tril().bool())
            logits = model(x0[:, : i + 1], positions=torch.arange(i + 1), mask=tril)[:, -1]
            logits[:, MASK] = NEG_INF
            expected[:, i] = -logits.log_softmax(-1).gather(-1, x0[:, i + 1 : i + 2])[:, 0]
    torch.testing.assert_close(out.nlls, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-5, atol=1e-6)


def test_loglinear_schedule_values():
    noise = LogLinear()
    t = torch.tensor([0.25, 0.5, 1.0])
    scale, move = noise(t)
    assert torch.equal(move, t) and torch.allclose(scale, -1 / t)
    assert noise.sigma_max == pytest.approx(6.907755, abs=1e-6)
    assert noise.total_noise(torch.tensor(1.0)).item() == pytest.approx(-math.log(1e-3), rel=1e-5)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_weight_is_d_alpha_over_one_minus_alpha(name):
    """loss_scale = alpha'/(1 - alpha) = -move'/move away from the clamps."""
    noise = build_noise(name)
    t = torch.tensor([0.3, 0.6, 0.9], requires_grad=True)
    move = noise.move_chance(t)
    (grad,) = torch.autograd.grad(move.sum(), t)
    expected = -grad / move
    if name == "cosine":  # the reference's cosine adds eps to the denominator
        expected = -grad / (move + noise.eps)
    torch.testing.assert_close(noise.loss_scale(t.detach()), expected.detach(), rtol=1e-5, atol=0)


def test_double_length_rows_are_cropped_for_text8(tiny_dit):
    """text8-crop: 2L rows -> a random L window with BOS first; AR targets are the
    window shifted by one, ending in EOS."""
    from algorithms.base import DoubleLengthCrop

    crop = DoubleLengthCrop(bos_id=1, eos_id=2, insert_special=True)
    x = torch.arange(10, 26).repeat(2, 1)  # (2, 16) = 2L with L = 8
    inputs, target, mask = crop(x, torch.ones(2, 16), 8, torch.Generator().manual_seed(0))
    start = int(inputs[0, 1]) - 10 - 1
    assert inputs[0, 0] == 1 and target[0, -1] == 2 and mask.shape == (2, 8)
    assert torch.equal(inputs[:, 1:], x[:, start + 1 : start + 8])
    assert torch.equal(target[:, :-1], x[:, start + 1 : start + 8])
    net = network_for(tiny_dit())
    algo = masked_diffusion(8, 4, crop=crop)
    with torch.no_grad():
        out = algo.loss(net, x % MASK, torch.ones(2, 16), f32(1e-3), f32(1.0), train=True)
    assert out.nlls.shape == (2, 8) and torch.isfinite(out.loss)
    ar = Autoregressive(mask_id=MASK, seq_len=8, crop=crop)
    with torch.no_grad():
        ar_net = network_for(tiny_dit(causal=True))
        out = ar.loss(ar_net, x % MASK, torch.ones(2, 16), *[f32(1)] * 2, train=True)
    assert out.nlls.shape == (2, 8) and torch.isfinite(out.loss)
