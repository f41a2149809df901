"""Every fast path keeps the numbers of the implementation it replaced (benchmarks/baselines.py:
logits, gradients, losses), the fast samplers keep their distribution and cached == uncached,
and parallel decoding with one token per step is the exact first-hitting sampler."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

import sampling
from algorithms.base import Layout, subs_log_probs
from algorithms.masked_diffusion import MaskedDiffusion
from benchmarks import baselines
from conftest import (
    P_VALUE,
    chi_square_p,
    module_denoiser,
    randomize_,
    sample_with,
    sampler_cfg,
    tiny_module,
    two_sample_p,
)
from models.attention import BlockDiffusionMask, MaskCache, block_diffusion_attend
from models.dit import DiT, DiTConfig
from noise_schedule import LogLinear
from sampling import draws

V, MASK = 37, 36
SWITCHES = [(False, False), (True, True), (True, False), (False, True)]


def dit(prune: bool) -> DiT:
    """The tiny DiT (seeded weights); prune=False: its baseline without last-layer pruning."""
    config = DiTConfig(
        vocab_size=V, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0
    )
    model = randomize_(DiT(config), seed=0)
    return model if prune else baselines.unpruned(model)


def served(mask, structured: bool):
    """The mask as the fast path serves it, or (structured=False) as dense SDPA."""
    return mask if structured else baselines.without_structure(mask)


def network_for(model, structured: bool = True):
    cache = MaskCache("sdpa")

    def network(tokens, sigma, layout: Layout):
        S = tokens.shape[1]
        positions = torch.arange(S // layout.halves).repeat(layout.halves)
        mask = served(cache.get(layout.mask, S, S, "cpu"), structured)
        return model(tokens, positions=positions, mask=mask, sigma=sigma, outputs=layout.outputs)

    return network


@pytest.mark.parametrize("L,K", [(16, 4), (24, 8), (16, 16), (16, 1), (20, 4)])
def test_dit_switches_keep_logits_and_gradients(L, K):
    x = torch.randint(0, V - 1, (2, 2 * L), generator=torch.Generator().manual_seed(1))
    positions, sigma = torch.arange(L).repeat(2), torch.zeros(2)
    select = torch.rand(2, L, generator=torch.Generator().manual_seed(2)) < 0.5
    mask = MaskCache("sdpa").get(BlockDiffusionMask(L, K), 2 * L, 2 * L, "cpu")
    results = []
    for structured, prune in SWITCHES:
        model = dit(prune)
        for outputs in (select, slice(0, L)):
            served_mask = served(mask, structured)
            logits = model(x, positions=positions, mask=served_mask, sigma=sigma, outputs=outputs)
            logits.square().mean().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            results.append((logits, grads))
    for logits, grads in results[2:]:
        ref_logits, ref_grads = results[0] if logits.dim() == 2 else results[1]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("K", [4, 16])
@pytest.mark.parametrize("cross_attn", [True, False])
def test_nelbo_is_the_same_with_and_without_the_switches(K, cross_attn):
    L = 16
    algo = MaskedDiffusion(LogLinear(), MASK, L, K, cross_attn, False, False, True)
    x0 = torch.randint(0, V - 1, (3, L), generator=torch.Generator().manual_seed(0))
    eps = torch.tensor(1e-3), torch.tensor(1.0)
    losses = []
    fields = {f.name: getattr(algo, f.name) for f in dataclasses.fields(algo)}
    for (structured, prune), masked_outputs in itertools.product(SWITCHES, (True, False)):
        net = network_for(dit(prune), structured)
        algo = MaskedDiffusion(**fields) if masked_outputs else baselines.DenseNELBO(**fields)
        gen = torch.Generator().manual_seed(5)
        out = algo.loss(net, x0, torch.ones(3, L), *eps, train=True, generator=gen)
        losses.append(out.loss)
        out.loss.backward()
    assert losses[0] > 0
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L,K", [(16, 4), (20, 4), (64, 4), (32, 16), (12, 1)])
def test_structured_attention_equals_sdpa_over_the_dense_mask(L, K):
    """The chunked path against SDPA over the materialised (2L, 2L) mask, all 2L query rows
    and the x_t rows alone (the pruned last layer), values and gradients."""
    gen = torch.Generator().manual_seed(L + K)
    q, k, v = (torch.randn(2, 3, 2 * L, 8, generator=gen, requires_grad=True) for _ in range(3))
    mask = MaskCache("sdpa").get(BlockDiffusionMask(L, K), 2 * L, 2 * L, "cpu")
    assert len(mask.parts["spans"]) > 1 or K == L
    for rows in (2 * L, L):
        ref = F.scaled_dot_product_attention(q[:, :, :rows], k, v, attn_mask=mask.dense[:rows])
        out = block_diffusion_attend(q[:, :, :rows], k, v, mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_pruned_last_layer_matches_full_outputs_sliced():
    L, K = 16, 4
    x = torch.randint(0, V - 1, (2, 2 * L), generator=torch.Generator().manual_seed(1))
    mask = MaskCache("sdpa").get(BlockDiffusionMask(L, K), 2 * L, 2 * L, "cpu")
    call = dict(positions=torch.arange(L).repeat(2), mask=mask, sigma=torch.zeros(2))
    with torch.no_grad():
        full = dit(False)(x, **call)[:, :L]
        pruned = dit(True)(x, **call, outputs=slice(0, L))
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-5)


def test_subs_log_probs_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, V, generator=gen) * 4
    xt = torch.randint(0, V, (3, 5), generator=gen)
    xt[0] = MASK
    torch.testing.assert_close(
        subs_log_probs(logits, xt, MASK), baselines.subs_log_probs_reference(logits, xt, MASK)
    )


def test_inverse_cdf_matches_its_distribution_and_skips_zeros():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0], dtype=torch.float64).expand(20_000, 5)
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = draws.sample_inverse_cdf(probs, u)
    assert chi_square_p(torch.bincount(drawn, minlength=5), probs[0] * 20_000) > P_VALUE
    edge = draws.sample_inverse_cdf(probs[:2], torch.tensor([0.0, 1.0 - 2**-53]).double())
    assert edge.tolist() == [0, 3]


class Confident:
    """A ModelDenoiser whose denoiser puts `p` on token 3 and the rest uniformly elsewhere."""

    def __init__(self, p: float):
        self.p, self.calls = p, 0

    def logprobs(
        self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False, rows=None
    ):
        self.calls += 1
        shape = (x.shape[0], num_last if rows is None else rows.shape[1], 6)
        probs = torch.full(shape, (1 - self.p) / 4)
        probs[..., 3], probs[..., 5] = self.p, 0.0
        return probs.log()

    def commit(self, x, key_valid, cache):
        pass

    def new_cache(self, batch_size, block_size):
        return None


def _cfg(**kw):
    return sampling.SamplerConfig(12, 4, 50, 12, 0, 5, 0, reject_low_entropy=False, **kw)


def _sample(model, cfg, batch=3):
    gen = torch.Generator().manual_seed(0)
    return sampling.semi_ar_sample(model, batch, cfg, gen, torch.device("cpu"))


def test_a_threshold_that_cannot_fire_changes_nothing():
    """No row reaches probability 0.9 (the denoiser's best is 0.5): the threshold commits
    nothing and draws no extra random numbers, so the samples are first-hitting's."""
    exact = _sample(Confident(0.5), _cfg())
    one = _sample(Confident(0.5), _cfg(tokens_per_step=1, confidence_threshold=0.9))
    assert torch.equal(exact.tokens, one.tokens) and torch.equal(exact.nfe_denoise, one.nfe_denoise)
    assert exact.nfe_denoise.tolist() == [11] * 3 and not (exact.tokens == 5).any()


def test_parallel_decoding_commits_several_tokens_per_call():
    model = Confident(0.5)
    two = _sample(model, _cfg(tokens_per_step=2))
    assert not (two.tokens == 5).any() and two.nfe_denoise.tolist() == [2 + 2 + 2] * 3
    model = Confident(0.95)
    sure = _sample(model, _cfg(confidence_threshold=0.9))
    assert (sure.tokens[:, 1:] == 3).all() and sure.nfe_denoise.tolist() == [3] * 3
    assert model.calls == 3  # one call per block


class ByPosition:
    """A ModelDenoiser whose row j puts 0.2 + 0.2 j on token 3: later rows are surer."""

    def __init__(self):
        self.blocks = []

    def logprobs(
        self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False, rows=None
    ):
        self.blocks.append(x[:, -num_last:].clone())
        sure = 0.2 + 0.2 * torch.arange(num_last, dtype=torch.float32)
        probs = ((1 - sure) / 4)[None, :, None].expand(x.shape[0], -1, 6).clone()
        probs[..., 3], probs[..., 5] = sure, 0.0
        probs = probs.log()
        return probs if rows is None else probs.gather(1, rows[..., None].expand(-1, -1, 6))


@pytest.mark.parametrize("k", [1, 2])
def test_confidence_order_unmasks_the_surest_positions_first(k):
    model = ByPosition()
    _sample(model, _cfg(tokens_per_step=k, unmask_order="confidence"))
    second_block = model.blocks[-(4 // k) :]  # the calls of the last block
    masked = [(b[0] == 5).nonzero().flatten().tolist() for b in second_block]
    assert masked == ([[0, 1, 2, 3], [0, 1, 2], [0, 1], [0]] if k == 1 else [[0, 1, 2, 3], [0, 1]])


def test_lazy_and_reference_draws_give_the_same_distribution():
    """Token frequencies of the two first-hitting draws agree (they use other random numbers)."""
    counts = []
    for reference in (False, True):
        with baselines.reference_draws() if reference else contextlib.nullcontext():
            out = _sample(Confident(0.5), _cfg(), batch=400)
        counts.append(torch.bincount(out.tokens[:, 1:].flatten(), minlength=6).double())
    assert two_sample_p(*counts) > P_VALUE


@pytest.mark.parametrize(
    "kw", [dict(tokens_per_step=2), dict(confidence_threshold=0.3), dict(entropy_bound=2.0)]
)
def test_parallel_decoding_cache_equals_recomputation(kw):

    module = tiny_module("bd3lm")
    cfg = dataclasses.replace(sampler_cfg(40, 4), **kw)
    with torch.no_grad():
        cached, calls_c = sample_with(module, cfg, cached=True)
        fresh, calls_f = sample_with(module, cfg, cached=False)
    assert len(calls_c) == len(calls_f)
    for a, b in zip(calls_c, calls_f, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.tokens, fresh.tokens) and not (cached.tokens == 40).any()


@pytest.mark.parametrize("cached", [False, True])
def test_selected_rows_equal_the_full_output(cached):
    """logprobs(rows=...) runs the output layer on the chosen rows only: same values."""

    model = module_denoiser(tiny_module("bd3lm"), 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 40, (3, 8), generator=gen)
    x[:, 5:] = 40  # the mask id of tiny_module's vocabulary
    t = torch.full((3,), 0.7, dtype=torch.float64)
    rows = torch.tensor([[0, 3], [1, 2], [2, 3]])

    def call(**kw):
        cache = model.new_cache(3, 4) if cached else None
        if cached:
            model.commit(x[:, :4], None, cache)
        return model.logprobs(x, t, 4, None, cache, **kw)

    with torch.no_grad():
        full, some = call(), call(rows=rows)
    assert some.shape == (3, 2, 41)
    torch.testing.assert_close(some, full.gather(1, rows[..., None].expand(-1, -1, 41)))


def test_inference_projection_equals_linear_and_is_used_only_for_cpu_inference():
    """The CPU inference projection (DiT.transposed_head, a (D, V) copy) gives F.linear's
    logits for a GEMV and GEMMs; with autograd on, the plain F.linear runs."""
    model = dit(True)
    layer = model.output_layer
    with torch.no_grad():
        layer.linear.weight.mul_(-2.0)  # not a zero-initialised layer
        layer.linear.bias.add_(0.3)
    head_t = model.transposed_head()
    assert head_t.shape == (32, V) and head_t.is_contiguous()
    h = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for rows in (h[:1, :1], h[:, :2], h):  # a GEMV and GEMMs
            expected = F.linear(rows, layer.linear.weight, layer.linear.bias)
            got = layer._project(rows, head_t)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        stale = head_t * 0  # a copy that no longer matches the weight is what gets used
        assert layer._project(h, stale).abs().sub(layer.linear.bias.abs()).abs().max() < 1e-6
    assert layer._project(h, head_t).requires_grad  # with autograd on: the plain F.linear


def test_a_denoiser_snapshots_its_weights_until_prepare_inference():
    """Without time conditioning the denoiser computes the adaLN modulation once and keeps the
    transposed head: a weight change (here the last block's adaLN and the output layer)
    reaches its calls after prepare_inference(), and then equals a fresh denoiser and the
    baseline that recomputes everything at every call. With time conditioning the
    modulation follows t."""
    module = tiny_module("bd3lm")
    model = module_denoiser(module, 16)
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    x[:, 5:] = 40
    t = torch.full((2,), 0.7, dtype=torch.float64)
    with torch.no_grad():
        before = model.logprobs(x, t, 4, None, None)
        torch.testing.assert_close(model.logprobs(x, t * 0.5, 4, None, None), before)
        module.backbone.blocks[-1].adaLN_modulation.bias.add_(0.5)
        module.backbone.output_layer.linear.weight.mul_(1.5)
        torch.testing.assert_close(model.logprobs(x, t, 4, None, None), before)  # a snapshot
        model.prepare_inference()
        after = model.logprobs(x, t, 4, None, None)
        fresh = module_denoiser(module, 16).logprobs(x, t, 4, None, None)
        plain = baselines.BaselineDenoiser(module.backbone, module.algorithm, 16)
        recomputed = plain.logprobs(x, t, 4, None, None)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    torch.testing.assert_close(after, recomputed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)

    timed = tiny_module("bd3lm", 16, "algo.time_conditioning=true")
    randomize_(timed.backbone, seed=4, scale=0.3)
    model = module_denoiser(timed, 16)
    with torch.no_grad():
        assert not torch.allclose(
            model.logprobs(x, t, 4, None, None), model.logprobs(x, t * 0.5, 4, None, None)
        )


class TwoKinds:
    """A ModelDenoiser whose block rows 0-1 are a coin between tokens 1 and 2 (entropy ln 2)
    and rows 2-3 uniform over tokens 0-4 (entropy ln 5)."""

    def logprobs(
        self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False, rows=None
    ):
        probs = torch.zeros(x.shape[0], num_last, 6)
        probs[:, :2, 1:3] = 0.5
        probs[:, 2:, :5] = 0.2
        probs = probs.log()
        return probs if rows is None else probs.gather(1, rows[..., None].expand(-1, -1, 6))


@pytest.mark.parametrize("bound,calls", [(1.0, 9), (2.0, 6)])
def test_entropy_budget_commits_the_lowest_entropy_rows_and_draws_their_tokens(bound, calls):
    """Each call commits the most confident masked row, then the lowest-entropy ones while
    their entropies sum to <= bound. A full block (rows 0-1 coins, ln 2; rows 2-3 uniform,
    ln 5): at 1.0, rows {0, 1}, {2}, {3}; at 2.0, rows {0, 1} then {2, 3} (ln 2 + ln 5 > 2
    keeps row 2 out of the first call). The first block (row 0 is BOS): 3 calls at 1.0, 2 at
    2.0. Rows joined by the budget get draws (both coin sides), not argmaxes."""
    out = _sample(TwoKinds(), _cfg(entropy_bound=bound, unmask_order="confidence"), batch=400)
    assert out.nfe_denoise.tolist() == [calls] * 400 and not (out.tokens == 5).any()
    coin = out.tokens[:, [5, 9]].flatten()  # row 1 of blocks 2 and 3: joined by the budget
    assert set(coin.tolist()) == {1, 2}
    counts = torch.stack([(coin == 1).sum(), (coin == 2).sum()])
    assert chi_square_p(counts, torch.full((2,), coin.numel() / 2)) > P_VALUE
    with pytest.raises(ValueError, match="entropy_bound"):
        _cfg(entropy_bound=0.0)


@pytest.mark.parametrize("gamma,calls", [(1.0, 8), (2.0, 6)])
def test_eb_rule_counts_the_largest_entropy_free(gamma, calls):
    """The EB-sampler rule on the same model: the lowest-entropy rows while sum - max <= gamma.
    A full block (ln 2, ln 2, ln 5, ln 5), gamma 1: {0, 1} (ln 2 <= 1, but 2 ln 2 > 1), then
    {2}, {3}: 3 calls; the first block (rows 1-3: ln 2, ln 5, ln 5): {1, 2}, {3}: 2 calls, 8 in
    all, where the entropy budget at 1.0 (confidence order, above) takes 9. gamma 2:
    {0, 1, 2} then {3}, and 2 calls for the first block: 6."""
    out = _sample(TwoKinds(), _cfg(eb_gamma=gamma), batch=400)
    assert out.nfe_denoise.tolist() == [calls] * 400 and not (out.tokens == 5).any()
    coin = out.tokens[:, [4, 8]].flatten()  # row 0 of blocks 2 and 3: drawn, not an argmax
    assert set(coin.tolist()) == {1, 2}
    with pytest.raises(ValueError, match="eb_gamma chooses the positions itself"):
        _cfg(eb_gamma=1.0, entropy_bound=1.0)
