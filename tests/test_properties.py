"""Properties of the maths that a one-line mistake would break (found by mutation testing,
docs/mutation.md): the BD3-LM NELBO for 1 < K < L against a per-block brute force, the
sampler's block conditional against the training forward pass, position sensitivity of the
rotary DiT, uniform first-hitting positions, one antithetic t per stratum.

Statistical tests are seeded and use a stated threshold: chi-square p < 1e-6 (a correct
implementation fails by chance less than once in a million seeds)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import sampling
from algorithms.base import Shard, sample_t, subs_log_probs
from algorithms.masked_diffusion import MaskedDiffusion
from benchmarks import baselines
from conftest import P_VALUE, chi_square_p, randomize_, two_sample_p
from models.attention import BlockCausalMask, MaskCache
from models.network import BackboneNetwork
from noise_schedule import LogLinear
from sampling import ModelDenoiser, draws, stops

V, MASK = 37, 36


def bd3lm(L: int, K: int) -> MaskedDiffusion:
    return MaskedDiffusion(LogLinear(), MASK, L, K, cross_attn=True, ignore_bos=True,
                           time_conditioning=False, antithetic=True)  # fmt: skip


def test_chi_square_helper():
    assert chi_square_p(torch.tensor([50, 50]), torch.tensor([50.0, 50.0])) == pytest.approx(1)
    # 3 bins (df = 2, p = exp(-statistic / 2)): statistic a^2 / 50 = 2 ln 1000 for a = 26.28
    a = math.sqrt(100 * math.log(1000))
    p = chi_square_p(torch.tensor([100 + a, 100 - a, 100.0]), torch.full((3,), 100.0))
    assert p == pytest.approx(1e-3, rel=1e-4)
    assert two_sample_p(torch.tensor([30, 70]), torch.tensor([300, 700])) == pytest.approx(1)
    assert two_sample_p(torch.tensor([70, 30]), torch.tensor([300, 700])) < P_VALUE


@pytest.mark.parametrize("L,K", [(12, 4), (12, 3), (16, 8)])
def test_bd3lm_nelbo_equals_a_per_block_brute_force(tiny_dit, L, K):
    """For 1 < K < L: block b's terms are (1/t_b) (-log p(x0_i | x_t block b, x0 blocks < b)),
    computed here block by block on [x0 blocks < b ; x_t block b] under the block-causal mask,
    against the vectorised [x_t ; x_0] pass with the block-diffusion mask."""
    model = tiny_dit()
    algo = bd3lm(L, K)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, MASK, (3, L), generator=gen)
    eps = (torch.tensor(1e-3), torch.tensor(1.0))
    xt, scale, sigma = algo.corrupt(x0, *eps, gen)
    assert (xt == MASK).any() and (xt != MASK).sum() > L  # both kinds of positions occur
    with torch.no_grad():
        out = algo.nelbo(BackboneNetwork(model), x0, xt, scale, sigma, torch.ones(3, L), False)
        expected = torch.zeros(3, L)
        masks = MaskCache("sdpa")
        for b in range(L // K):
            block = slice(b * K, (b + 1) * K)
            tokens = torch.cat([x0[:, : b * K], xt[:, block]], dim=1)
            S = tokens.shape[1]
            mask = masks.get(BlockCausalMask(K), S, S, "cpu")
            sigma, positions = torch.zeros(3), torch.arange(S)
            logits = model(tokens, positions=positions, mask=mask, sigma=sigma)[:, -K:]
            log_p = subs_log_probs(logits, xt[:, block], MASK)
            terms = scale.expand(3, L)[:, block] * log_p.gather(-1, x0[:, block, None])[..., 0]
            expected[:, block] = terms
        expected[:, 0] = 0  # ignore_bos at evaluation: position 0 leaves the sums
    torch.testing.assert_close(out.nlls, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True])
def test_sampler_conditional_equals_the_training_forward_block_by_block(tiny_dit, cached):
    """What the sampler's denoiser returns for block b given clean blocks < b (uncached, and
    through the KV cache) is the SUBS distribution the training forward pass computes for that
    block of x_t with x_0 as the context."""
    L, K = 16, 4
    model = tiny_dit()
    algo = bd3lm(L, K)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, MASK, (2, L), generator=gen)
    xt, _, _ = algo.corrupt(x0, torch.tensor(1e-3), torch.tensor(1.0), gen)
    network = BackboneNetwork(model)
    with torch.no_grad():
        layout = algo.train_layout
        logits = network(torch.cat([xt, x0], dim=1), torch.zeros(2), layout)  # (B, L, V)
        training = subs_log_probs(logits, xt, MASK)
        sampler = ModelDenoiser(model, algo, window=L)
        cache = sampler.new_cache(2, K) if cached else None
        t = torch.ones(2, dtype=torch.float64)
        for b in range(L // K):
            x = torch.cat([x0[:, : b * K], xt[:, b * K : (b + 1) * K]], dim=1)
            got = sampler.logprobs(x, t, K, None, cache)
            torch.testing.assert_close(got, training[:, b * K : (b + 1) * K], rtol=1e-5, atol=1e-5)
            if cached:  # the clean block goes into the cache before the next one
                sampler.commit(torch.cat([x0[:, : (b + 1) * K]], dim=1), None, cache)


def _logits(model, x, positions):
    mask = MaskCache("sdpa").get(None, x.shape[1], x.shape[1], "cpu")
    with torch.no_grad():
        return model(x, positions=positions, mask=mask, sigma=torch.zeros(x.shape[0]))


def test_moving_a_token_changes_the_other_positions_logits(tiny_dit):
    """Under full attention without positions the output at a position would not depend on
    where the other tokens stand; rotary makes it depend on their offsets."""
    model = tiny_dit()
    x = torch.randint(0, MASK, (1, 8), generator=torch.Generator().manual_seed(5))
    swapped = x.clone()
    swapped[0, [2, 6]] = x[0, [6, 2]]
    a, b = _logits(model, x, torch.arange(8)), _logits(model, swapped, torch.arange(8))
    untouched = [0, 1, 3, 4, 5, 7]
    assert (a[:, untouched] - b[:, untouched]).abs().max() > 1e-3


def test_logits_depend_on_relative_positions_only(tiny_dit):
    """Shifting every position by the same offset changes nothing (rotary scores depend on
    q - k only); stretching the positions changes the logits."""
    model = tiny_dit()
    x = torch.randint(0, MASK, (2, 8), generator=torch.Generator().manual_seed(6))
    base = _logits(model, x, torch.arange(8))
    shifted = _logits(model, x, torch.arange(8) + 37)
    stretched = _logits(model, x, 2 * torch.arange(8))
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    assert (stretched - base).abs().max() > 1e-3


class DistinctRows:
    """A denoiser whose row j of a block always predicts token j: the token tells which
    position a call committed. Records each call's block."""

    def __init__(self, K: int):
        self.K, self.blocks = K, []

    def logprobs(self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False,
                 rows=None):  # fmt: skip
        self.blocks.append(x[:, -num_last:].clone())
        logits = torch.full((x.shape[0], num_last, V), -1e6)
        logits[:, torch.arange(num_last), torch.arange(num_last)] = 0.0
        log_p = torch.log_softmax(logits, -1)
        return log_p if rows is None else log_p.gather(1, rows[..., None].expand(-1, -1, V))

    def commit(self, x, key_valid, cache):
        pass

    def new_cache(self, batch_size, block_size):
        return None


@pytest.mark.parametrize("reference", [False, True])
def test_first_hitting_commits_a_uniformly_chosen_masked_position(reference):
    """The first call of a fully masked block commits one of its K positions uniformly at
    random (chi-square over 4000 sequences, p > 1e-6), and then one of the remaining ones."""
    K, batch = 4, 4000
    model = DistinctRows(K)
    cfg = sampling.SamplerConfig(length=2 * K, block_size=K, num_steps=8, context=2 * K,
                                 bos_id=MASK - 1, mask_id=MASK, eos_id=MASK - 1,
                                 reject_low_entropy=False)  # fmt: skip
    with baselines.reference_draws() if reference else contextlib.nullcontext():
        sampling.semi_ar_sample(model, batch, cfg, torch.Generator().manual_seed(0), "cpu")
    second_block = model.blocks[K - 1 :]  # the first block has its BOS: K - 1 calls
    after_first = second_block[1]  # the block as the second call sees it
    committed = after_first != MASK
    assert (committed.sum(-1) == 1).all()
    first = committed.int().argmax(-1)
    assert torch.equal(after_first.gather(1, first[:, None])[:, 0], first)  # row j -> token j
    counts = torch.bincount(first, minlength=K)
    assert chi_square_p(counts, torch.full((K,), batch / K)) > P_VALUE, counts
    after_second = second_block[2] != MASK
    second = (after_second & ~committed).int().argmax(-1)
    pairs = torch.bincount(first * K + second, minlength=K * K).view(K, K)
    off_diagonal = pairs[~torch.eye(K, dtype=torch.bool)]
    assert pairs.diagonal().sum() == 0
    expected = torch.full((K * (K - 1),), batch / (K * (K - 1)))
    assert chi_square_p(off_diagonal, expected) > P_VALUE, pairs


@pytest.mark.parametrize("world", [1, 2])
def test_antithetic_sampling_puts_one_t_in_each_stratum(world):
    """For random u: row b, block j of the (global) batch gets t in stratum b nb + j of width
    1/N, N = rows x nb, and its offset inside the stratum is the raw draw u[b, j]."""
    B, L, K = 3, 16, 4
    nb, N = L // K, B * world * (L // K)
    eps = (torch.tensor(0.0), torch.tensor(1.0))
    raw = torch.rand(B * world, nb, generator=torch.Generator().manual_seed(9))
    strata = torch.arange(B * world * nb).view(B * world, nb)
    for rank in range(world):
        shard = Shard.interleaved(B, rank, world, "cpu") if world > 1 else None
        gen = torch.Generator().manual_seed(9)
        t = sample_t(B, L, K, *eps, True, "cpu", gen, shard).view(B, nb, K)[..., 0].double()
        rows = torch.arange(B) * world + rank
        assert torch.equal(torch.floor(t * N).long(), strata[rows])
        torch.testing.assert_close(t * N - strata[rows], raw[rows].double(), rtol=0, atol=1e-5)
    assert math.isclose(N, strata.numel())


# ----------------------------------------------------------------------------------------------
# Forward process details a one-line change would alter
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "low,high,allowed", [(0.45, 0.8, (2, 3)), (1e-3, 0.5, (0, 1, 2)), (0.5, 1.0, (2, 3, 4))]
)
def test_resampled_blocks_follow_the_binomial_conditioned_on_the_interval(low, high, allowed):
    """Resampling redraws out-of-range blocks with the same per-token chance p, so a block's
    masked count is Binomial(K, p) conditioned on count / K in [low, high] (bounds included;
    with only one bound clipped, only that bound is enforced)."""
    from algorithms.base import q_xt

    K, blocks, p = 4, 6000, 0.6
    x0 = torch.zeros(blocks // 8, 8 * K, dtype=torch.long)
    gen = torch.Generator().manual_seed(12)
    move = torch.full((blocks // 8, 1), p)
    xt = q_xt(x0, move, MASK, K, torch.tensor(low), torch.tensor(high), True, gen)
    counts = torch.bincount((xt.view(-1, K) == MASK).sum(-1), minlength=K + 1)
    law = torch.tensor([math.comb(K, j) * p**j * (1 - p) ** (K - j) for j in range(K + 1)])
    law = torch.tensor([law[j] if j in allowed else 0.0 for j in range(K + 1)])
    assert chi_square_p(counts, law / law.sum() * blocks) > P_VALUE, counts


def test_sigma_is_the_first_blocks_and_averaged_per_sequence():
    from algorithms.base import process_sigma, sigma_from_p

    algo = bd3lm(16, 4)
    x0 = torch.zeros(3, 16, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    t = sample_t(3, 16, 4, torch.tensor(1e-3), torch.tensor(1.0), True, "cpu",
                 torch.Generator().manual_seed(0))  # fmt: skip
    _, _, sigma = algo.corrupt(x0, torch.tensor(1e-3), torch.tensor(1.0), gen)
    torch.testing.assert_close(sigma, sigma_from_p(t[:, :1], LogLinear().sigma_max))
    assert not torch.allclose(t[:, :1], t[:, -1:])  # the blocks' t differ
    assert torch.equal(process_sigma(torch.tensor([[1.0, 3.0]]), True), torch.tensor([2.0]))
    assert torch.equal(process_sigma(torch.tensor([[1.0, 3.0]]), False), torch.tensor([0.0]))


def test_mdlm_loss_scale_masks_with_one_minus_eps_times_t(monkeypatch):
    """mdlm_loss_scale: the chance is 1 - exp(-sigma(t)) = (1 - eps) t, the weight -1/t."""
    import algorithms.masking as masking

    seen = {}

    def capture(x0, move_chance, *args):
        seen["move"] = move_chance
        return x0.clone()

    monkeypatch.setattr(masking, "q_xt", capture)
    algo = MaskedDiffusion(
        LogLinear(), MASK, 16, 4, cross_attn=True, ignore_bos=False, time_conditioning=False,
        antithetic=True, mdlm_loss_scale=True,
    )  # fmt: skip
    eps = (torch.tensor(1e-3), torch.tensor(1.0))
    _, scale, _ = algo.corrupt(torch.zeros(2, 16, dtype=torch.long), *eps, torch.Generator())
    t = sample_t(2, 16, 4, *eps, True, "cpu", torch.Generator())
    torch.testing.assert_close(seen["move"], (1 - 1e-3) * t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scale, -1 / t, rtol=1e-4, atol=0)


def test_the_nll_weight_override_needs_eps_min_above_one_half():
    """Weight -1 is NLL mode (K = 1, t = 1); the clip grid's interval [0.5, 1] keeps -1/t."""
    algo = bd3lm(16, 4)
    x0 = torch.zeros(2, 16, dtype=torch.long)
    _, scale, _ = algo.corrupt(x0, torch.tensor(0.5), torch.tensor(1.0), torch.Generator())
    assert (scale < -1).all()
    assert algo.eval_interval() == (1e-3, 1.0) and bd3lm(16, 1).eval_interval() == (1.0, 1.0)


def test_ar_weights_are_the_targets_attention_mask(tiny_dit):
    """Padding (attention mask 0 at the end of a row) weighs the targets it covers."""
    from algorithms.ar import Autoregressive

    net = BackboneNetwork(tiny_dit(causal=True))
    x0 = torch.randint(0, MASK, (1, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 9)
    mask[0, 6:] = 0  # the last 3 tokens are padding
    ar = Autoregressive(mask_id=MASK, seq_len=9)
    with torch.no_grad():
        out = ar.loss(net, x0, mask, torch.tensor(1.0), torch.tensor(1.0), train=False)
    assert (out.nlls[0, 5:] == 0).all() and (out.nlls[0, :5] > 0).all()
    assert out.token_mask.sum() == 5


def test_ar_sampling_never_proposes_the_mask_token(tiny_dit):
    from algorithms.ar import Autoregressive

    model = randomize_(tiny_dit(causal=True), seed=2, scale=0.5)
    sampler = ModelDenoiser(model, Autoregressive(mask_id=MASK, seq_len=8), window=8)
    x = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        log_p = sampler.logprobs(x, torch.zeros(2), 1, None, None)
    assert (log_p[..., MASK] < -1e5).all()
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 1))


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------
def test_analytic_steps_span_the_schedule_from_one_to_eps(monkeypatch):
    """Step i moves from t_i to t_{i+1} of linspace(1, eps, T + 1): Delta_i = sigma(t_i) -
    sigma(t_{i+1}), and the final denoise uses sigma(eps)."""
    from algorithms.base import sigma_from_p
    from sampling import analytic as analytic_sampler

    deltas = []
    original = analytic_sampler._update

    def spy(score_fn, x, sigma, delta, cfg, generator, final):
        deltas.append(delta.clone())
        return original(score_fn, x, sigma, delta, cfg, generator, final)

    monkeypatch.setattr(analytic_sampler, "_update", spy)
    score = lambda x, sigma: torch.zeros(*x.shape, 9)  # noqa: E731
    cfg = sampling.SamplerConfig(length=6, block_size=1, num_steps=4, context=6, bos_id=0,
                                 mask_id=8, eos_id=0, reject_low_entropy=False)  # fmt: skip
    eps = 0.1
    analytic_sampler.analytic_sample(score, 2, cfg, torch.Generator().manual_seed(0), "cpu",
                                     eps=eps)  # fmt: skip
    ts = torch.linspace(1, eps, 5)
    sigma = sigma_from_p(ts, LogLinear().sigma_max)
    expected = [sigma[i] - sigma[i + 1] for i in range(4)] + [sigma[-1]]
    assert len(deltas) == 5
    for got, want in zip(deltas, expected, strict=True):
        torch.testing.assert_close(got, want.expand(2), rtol=1e-5, atol=1e-6)


def test_inverse_cdf_never_returns_a_leading_zero_and_nucleus_keeps_p_exactly():
    probs = torch.tensor([[0.0, 0.3, 0.7]], dtype=torch.float64)
    assert draws.sample_inverse_cdf(probs, torch.tensor([0.0]).double()).tolist() == [1]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    kept = draws.nucleus(probs, 0.8)  # cumulative 0.8 <= 0.8: the second token stays
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]).double())


def test_the_low_entropy_stop_is_four_nats():
    """256 tokens uniform over 40 ids (entropy ln 40 = 3.69 < 4) stop; over 60 ids (4.09)
    they do not."""
    cfg = sampling.SamplerConfig(length=600, block_size=4, num_steps=1, context=16, bos_id=0,
                                 mask_id=MASK, eos_id=0, var_length=True)  # fmt: skip
    x = torch.stack([torch.arange(300) % 40 + 1, torch.arange(300) % 60 + 1])
    state = stops.SequenceState(torch.ones(2, dtype=torch.bool), torch.full((2,), 600),
                            ["length"] * 2)  # fmt: skip
    stops.apply_stop_rules(x, 0, 0, state, cfg)
    assert state.reasons == ["low_entropy", "length"]


class ClockRecorder(DistinctRows):
    """DistinctRows that also records the t of every call."""

    def __init__(self, K):
        super().__init__(K)
        self.ts = []

    def logprobs(self, x, t, *args, **kwargs):
        self.ts.append(t.clone())
        return super().logprobs(x, t, *args, **kwargs)


@pytest.mark.parametrize("reference", [False, True])
def test_first_hitting_clock_is_the_time_of_the_next_unmasking(reference):
    """With n masked tokens the next unmask time is t u^(1/n): from t = 1 and n = 4 the first
    call's t has P(t <= x) = x^4, so t^4 is uniform (chi-square over 10 bins, p > 1e-6), and
    the second call's (t_2 / t_1)^3 is uniform again."""
    K, batch = 4, 4000
    model = ClockRecorder(K)
    cfg = sampling.SamplerConfig(length=2 * K, block_size=K, num_steps=8, context=2 * K,
                                 bos_id=MASK - 1, mask_id=MASK, eos_id=MASK - 1,
                                 reject_low_entropy=False)  # fmt: skip
    with baselines.reference_draws() if reference else contextlib.nullcontext():
        sampling.semi_ar_sample(model, batch, cfg, torch.Generator().manual_seed(1), "cpu")
    t1, t2 = model.ts[K - 1], model.ts[K]  # the second block's first two calls
    for uniform in (t1**4, (t2 / t1) ** 3):
        counts = torch.bincount((uniform * 10).long().clamp(max=9), minlength=10)
        assert chi_square_p(counts, torch.full((10,), batch / 10)) > P_VALUE, counts
