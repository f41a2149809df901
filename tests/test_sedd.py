"""SEDD: the log-score parameterisation, the score-entropy loss and the analytic
sampler, including the variable-length fix (below)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from algorithms.base import Layout, process_sigma
from algorithms.sedd import SEDD, log_expm1, score_entropy, sedd_log_score
from conftest import P_VALUE, chi_square_p
from models.network import BackboneNetwork
from noise_schedule import LogLinear
from sampling import SamplerConfig
from sampling.analytic import _draw, _step_probs, analytic_sample

V, MASK, BOS, EOS = 37, 36, 0, 1
F32 = torch.float32


def f32(x):
    return torch.tensor(x, dtype=F32)


def network_for(model):
    """The glue's `network` callable for a bare DiT (what Diffusion.network is)."""
    return BackboneNetwork(model)


def sedd(L, **kw):
    return SEDD(noise=LogLinear(), mask_id=MASK, seq_len=L, **kw)


def perfect_network(x0):
    """Logits whose log score is the true ratio given x0: log s_{x0} = -log(e^sigma - 1)
    (= log r), every other token's score 0 (exp underflows)."""

    def network(tokens, sigma, layout):
        logits = torch.full((*tokens.shape, V), -1e4)
        logits.scatter_(-1, x0[..., None], math.log(V - 1))
        return logits[layout.outputs]

    return network


# ----------------------------------------------------------------------------------------------
# Parameterisation and loss
# ----------------------------------------------------------------------------------------------
def test_log_expm1_branch_at_half():
    """expm1 below sigma = 0.5, exp - 1 from 0.5 on; both branches differ from the other
    formula somewhere on the grid, so the test would see a swapped branch."""
    sigma = torch.linspace(1e-4, 3.0, 4001, dtype=F32)
    via_expm1, via_exp = torch.expm1(sigma).log(), (sigma.exp() - 1).log()
    got = log_expm1(sigma)
    low = sigma < 0.5
    assert torch.equal(got[low], via_expm1[low]) and torch.equal(got[~low], via_exp[~low])
    assert (via_expm1[low] != via_exp[low]).any() and (via_expm1[~low] != via_exp[~low]).any()


def test_log_score_formula_and_zero_at_xt():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, V, generator=gen)
    xt = torch.randint(0, V, (2, 5), generator=gen)
    sigma = f32([[0.2], [3.0]])
    log_s = sedd_log_score(logits, xt, sigma)
    expected = logits - log_expm1(sigma)[..., None] - math.log(V - 1)
    assert torch.equal(log_s.gather(-1, xt[..., None]), torch.zeros(2, 5, 1))
    keep = torch.ones_like(log_s, dtype=torch.bool).scatter_(-1, xt[..., None], False)
    assert torch.equal(log_s[keep], expected[keep])


def test_score_entropy_zero_at_true_ratios_positive_elsewhere():
    """float64: exactly the minimiser s_v = r 1[v = x0] gives 0; any other score more."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (64,), generator=gen)
    sigma = torch.rand(64, generator=gen, dtype=torch.float64) * 6 + 1e-3
    log_r = -torch.expm1(sigma).log()
    perfect = torch.full((64, V), -math.inf, dtype=torch.float64)
    perfect.scatter_(-1, x0[:, None], log_r[:, None])
    perfect[:, MASK] = 0.0
    torch.testing.assert_close(
        score_entropy(perfect, x0, sigma, MASK),
        torch.zeros(64, dtype=torch.float64),
        atol=1e-12,
        rtol=0,
    )
    noisy = perfect.clone()
    noisy.scatter_add_(-1, x0[:, None], torch.randn(64, 1, generator=gen, dtype=torch.float64))
    assert (score_entropy(noisy, x0, sigma, MASK) > 0).all()
    spread = torch.randn(64, V, generator=gen, dtype=torch.float64)
    assert (score_entropy(spread, x0, sigma, MASK) > 0).all()


def test_loss_zero_for_perfect_score_and_nonnegative_for_random_dit(tiny_dit):
    L, B = 16, 8
    algo = sedd(L)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (B, L), generator=gen)
    attn = torch.ones(B, L)
    out = algo.loss(perfect_network(x0), x0, attn, f32(1e-3), f32(1.0), train=True, generator=gen)
    assert out.nlls.abs().max().item() < 1e-4  # float32 rounding of r log r (r up to 1e3)
    random_net = network_for(tiny_dit(vocab_size=V))
    with torch.no_grad():
        out = algo.loss(random_net, x0, attn, f32(1e-3), f32(1.0), train=True, generator=gen)
    assert (out.nlls >= 0).all() and out.loss > 1.0


def test_loss_matches_the_dense_score_entropy(tiny_dit):
    """Masked-rows-only evaluation == score entropy (`score_entropy`'s formula) written densely
    over full (B, L, V) tensors."""
    L, B = 12, 6
    algo = sedd(L)
    net = network_for(tiny_dit(vocab_size=V))
    x0 = torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(1))
    attn = torch.ones(B, L)
    with torch.no_grad():
        got = algo.loss(
            net,
            x0,
            attn,
            f32(1e-3),
            f32(1.0),
            train=False,
            generator=torch.Generator().manual_seed(2),
        )
        xt, dsigma, sigma = algo.corrupt(x0, f32(1e-3), f32(1.0), torch.Generator().manual_seed(2))
        processed = process_sigma(sigma, True)
        log_s = sedd_log_score(net(xt, processed, Layout()), xt, processed[:, None])
    masked = xt == MASK
    score = log_s.exp()
    positive = score.sum(-1) - score[..., MASK]
    r = 1 / torch.expm1(sigma)
    entropy = positive - r * log_s.gather(-1, x0[..., None])[..., 0] + r * (r.log() - 1)
    nll = torch.where(masked, dsigma * entropy, 0.0)
    torch.testing.assert_close(got.nlls, nll * got.token_mask, rtol=1e-5, atol=1e-6)
    assert not masked[:, 0].any()  # ignore_bos
    # evaluation drops position 0 from the denominator, training keeps it
    assert got.token_mask.sum() == B * (L - 1)
    torch.testing.assert_close(got.loss, got.nlls.sum() / (B * (L - 1)))
    with torch.no_grad():
        train = algo.loss(
            net,
            x0,
            attn,
            f32(1e-3),
            f32(1.0),
            train=True,
            generator=torch.Generator().manual_seed(2),
        )
    torch.testing.assert_close(train.loss, train.nlls.sum() / (B * L))
    torch.testing.assert_close(train.nlls, got.nlls)


def test_dsigma_clipped_and_mdlm_loss_scale():
    L, B = 8, 16
    x0 = torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(0))
    _, dsigma, sigma = sedd(L).corrupt(x0, f32(1e-3), f32(1.0), torch.Generator().manual_seed(0))
    t = -torch.expm1(-sigma)  # sigma = -log(1 - t), unclipped below t = 0.999
    torch.testing.assert_close(dsigma, torch.expm1(sigma) / t)
    torch.testing.assert_close(dsigma, 1 / (1 - t), rtol=1e-4, atol=0)
    algo = sedd(L, mdlm_loss_scale=True)
    _, dsigma, sigma = algo.corrupt(x0, f32(1e-3), f32(1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(dsigma, (1 - 1e-3) * sigma.exp())  # rate_noise(t)
    # clipped: t close to 1 gives sigma = sigma_max and dsigma = expm1(sigma_max) / t
    _, dsigma, sigma = sedd(L).corrupt(x0, f32(0.9995), f32(1.0), torch.Generator())
    assert torch.allclose(sigma, torch.full_like(sigma, -math.log(1e-3)))
    assert (dsigma > 990).all() and (dsigma < 1000).all()


def test_sedd_interface_and_validation():
    algo = sedd(16)
    assert algo.block_size == 16 and algo.time_conditioning and algo.ignore_bos
    assert algo.eval_interval() == (1e-3, 1.0) and algo.sample_mask(16, False) is None
    assert algo.noise_sigma_max == pytest.approx(6.9078, abs=1e-4) and not algo.cross_attn
    with pytest.raises(ValueError, match="time_conditioning"):
        sedd(16, time_conditioning=False)


# ----------------------------------------------------------------------------------------------
# Analytic sampler
# ----------------------------------------------------------------------------------------------
def sampler_cfg(length, steps=8, context=None, **kw):
    """block_size is not read by the analytic sampler; 1 passes SamplerConfig's checks for
    any length and context."""
    return SamplerConfig(
        length=length,
        block_size=1,
        num_steps=steps,
        context=context or length,
        bos_id=BOS,
        mask_id=MASK,
        eos_id=EOS,
        **kw,
    )


def target_score_fn(target):
    """The true log score of a point mass on `target`: log r at the target token, 0 at the
    current token, -inf elsewhere."""

    def score_fn(x, sigma):
        out = torch.full((*x.shape, V), -math.inf)
        out.scatter_(-1, target[..., None], 0.0)
        out += -torch.expm1(sigma).log()[:, None, None]
        return out.scatter(-1, x[..., None], 0.0)

    return score_fn


def test_step_probs_match_the_dense_form():
    """Staggered score x transposed transition on full tensors at masked rows."""
    gen = torch.Generator().manual_seed(0)
    B, L = 2, 6
    x = torch.randint(0, MASK, (B, L), generator=gen)
    x[:, 1::2] = MASK
    score = torch.rand(B, L, V, generator=gen, dtype=torch.float64)
    delta = f32([0.3, 0.01])
    grow = delta.exp()
    stag = score * grow[:, None, None]
    stag[..., MASK] += (1 - grow)[:, None] * score.sum(-1)
    edge = torch.exp(-delta)[:, None, None] * F.one_hot(x, V)
    edge += torch.where(x == MASK, 1 - torch.exp(-delta)[:, None], 0)[..., None]
    dense = stag * edge
    masked = x == MASK
    rows = delta[:, None].expand(B, L)[masked]
    torch.testing.assert_close(_step_probs(score[masked], rows, MASK, False), dense[masked])
    final = _step_probs(score[masked], rows, MASK, True)
    assert (final[:, MASK] == 0).all()
    # unmasked rows: the transition keeps only the current token (why they are carried over)
    kept = dense[~masked]
    assert ((kept > 0).sum(-1) == 1).all() and torch.equal(kept.argmax(-1), x[~masked])


def test_two_stage_draw_has_the_categorical_law():
    """Stay-masked-then-token equals one categorical over V (negatives count as 0)."""
    probs = torch.tensor([0.5, 0.0, 2.0, -0.1, 1.5], dtype=torch.float64)  # mask id 4
    n = 40_000
    ids = _draw(probs.expand(n, 5).clone(), 4, torch.Generator().manual_seed(0))
    expected = probs.clamp(min=0) / probs.clamp(min=0).sum() * n
    assert chi_square_p(torch.bincount(ids, minlength=5), expected) > P_VALUE
    final = probs.clone()
    final[4] = 0
    assert (_draw(final.expand(100, 5).clone(), 4, torch.Generator()) != 4).all()


def test_analytic_sampler_tiny_dit_no_masks_and_deterministic(tiny_dit):
    L = 16
    model = tiny_dit(vocab_size=V)
    score_fn = sedd(L).score_fn(network_for(model))
    cfg = sampler_cfg(L, steps=6)

    def draw(seed, cfg=cfg):
        return analytic_sample(score_fn, 3, cfg, torch.Generator().manual_seed(seed), "cpu")

    out = draw(0)
    assert out.tokens.shape == (3, L) and not (out.tokens == MASK).any()
    assert (out.tokens[:, 0] == BOS).all() and out.lengths.tolist() == [L] * 3
    assert out.nfe_denoise.tolist() == [6] * 3 and out.stop_reason == ["length"] * 3
    assert torch.equal(draw(0).tokens, out.tokens)
    assert not torch.equal(draw(1).tokens, out.tokens)
    nucleus = draw(0, sampler_cfg(L, steps=6, nucleus_p=0.9))
    assert not (nucleus.tokens == MASK).any()
    with pytest.raises(ValueError, match="context"):
        analytic_sample(score_fn, 1, sampler_cfg(2 * L, context=L), torch.Generator(), "cpu")


def test_analytic_sampler_recovers_point_mass_exactly():
    """With the true score of a point mass, every sample is the target (zero probability of
    any other token), intermediate steps keep unmasked tokens, the final step clears masks."""
    L = 10
    target = torch.randint(2, MASK, (L,), generator=torch.Generator().manual_seed(0))
    target[0] = BOS
    targets = target.expand(4, L)
    for p in (1.0, 0.9):
        out = analytic_sample(
            target_score_fn(targets),
            4,
            sampler_cfg(L, steps=5, nucleus_p=p),
            torch.Generator().manual_seed(0),
            "cpu",
        )
        assert torch.equal(out.tokens, targets)


def test_var_length_keeps_samples_with_eos_truncated_after_it():
    """The reference rejected every SEDD sample containing an EOS; here the sample
    ends at its first generated EOS (kept). Fixed length keeps the whole sequence."""
    L = 12
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(2, MASK, (3, L), generator=gen)
    targets[:, 0] = BOS
    targets[0, 4] = EOS
    targets[0, 8] = EOS
    targets[2, 9] = EOS
    cfg = sampler_cfg(L, steps=4, var_length=True)
    out = analytic_sample(target_score_fn(targets), 3, cfg, torch.Generator(), "cpu")
    assert out.lengths.tolist() == [5, L, 10]
    assert out.stop_reason == ["eos", "length", "eos"]
    assert out.tokens[0, 4] == EOS and torch.equal(out.tokens, targets)
    fixed = analytic_sample(target_score_fn(targets), 3, sampler_cfg(L, steps=4), gen, "cpu")
    assert fixed.lengths.tolist() == [L] * 3 and fixed.stop_reason == ["length"] * 3


def test_prompt_is_kept_and_padding_refused():
    L, P = 8, 3
    prompt = torch.tensor([[BOS, 5, 6], [BOS, 7, 8]])
    targets = torch.cat([prompt, torch.full((2, L), 9)], dim=1)
    cfg = sampler_cfg(L, steps=3, context=L + P)
    out = analytic_sample(target_score_fn(targets), 2, cfg, torch.Generator(), "cpu", prompt)
    assert torch.equal(out.tokens, targets) and out.lengths.tolist() == [L + P] * 2
    valid = torch.tensor([[False, True, True], [True, True, True]])
    with pytest.raises(ValueError, match="padded"):
        analytic_sample(target_score_fn(targets), 2, cfg, torch.Generator(), "cpu", prompt, valid)
