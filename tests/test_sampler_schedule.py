"""The samplers' schedules and clocks, pinned: the DDPM grid t_i = 1 - i/T and s = t_i - 1/T
against a step-by-step reference loop, a time-conditioned network called at every step (and
a network that ignores t only when a token changed), the nucleus cut in both samplers, and
the stop rules' boundaries."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import registry
import sampling
from conftest import BOS_TINY, MASK_TINY, module_denoiser, tiny_module
from sampling import SamplerConfig, semi_ar_sample
from sampling.draws import nucleus, sample_categorical
from sampling.stops import ENTROPY_WINDOW, SequenceState, apply_stop_rules

V, MASK, BOS = 6, 5, 0
pytestmark = pytest.mark.usefixtures("one_thread")


class Spy:
    """A denoiser whose prediction leans to high tokens near t = 1 and to low ones near t = 0
    (when `uses_t`), and to the token a position already holds; records every call's t."""

    def __init__(self, time_conditioned: bool, uses_t: bool = True):
        self.time_conditioned, self.uses_t, self.ts = time_conditioned, uses_t, []
        self.masked = []  # per call: which rows still had a masked position

    def logprobs(self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False,
                 rows=None):  # fmt: skip
        self.ts.append(t.clone())
        self.masked.append((x[:, -num_last:] == MASK).any(-1))
        tokens = torch.arange(V, dtype=torch.float64)
        lean = 6 * (t[:, None, None] - 0.5) if self.uses_t else 1.0
        held = (x[:, -num_last:, None] == tokens).double()
        logits = lean * tokens + 0.7 * held
        logits[..., MASK] = -1e6
        log_p = torch.log_softmax(logits, -1)
        return log_p if rows is None else log_p.gather(1, rows[..., None].expand(-1, -1, V))


def ddpm_cfg(**kw) -> SamplerConfig:
    args = dict(length=8, block_size=4, num_steps=4, context=8, bos_id=BOS, mask_id=MASK,
                eos_id=BOS, first_hitting=False, reject_low_entropy=False)  # fmt: skip
    return SamplerConfig(**(args | kw))


def reference_ddpm(model, batch: int, cfg: SamplerConfig, seed: int) -> torch.Tensor:
    """Paper Algorithm 2 with the DDPM update written out: block by block, steps
    t_i = 1 - i/T, s = t_i - 1/T, the network called at every step (no reuse); each masked
    position draws a token with mass p_theta(x_0 | x_t) (1 - s/t) or stays masked with s/t."""
    generator = torch.Generator().manual_seed(seed)
    T, K, mask = cfg.num_steps, cfg.block_size, cfg.mask_id
    x = torch.empty(batch, 0, dtype=torch.long)
    for b in range(cfg.length // K):
        block = torch.full((batch, K), mask, dtype=torch.long)
        if b == 0:
            block[:, 0] = cfg.bos_id
        for i in range(T):
            if not (block == mask).any():
                break
            t = 1 - i / T
            s = t - 1 / T
            log_p = model.logprobs(
                torch.cat([x, block], 1), torch.full((batch,), t, dtype=torch.float64), K,
                None, None,
            )  # fmt: skip
            q = nucleus(log_p.double().exp(), cfg.nucleus_p) * (1 - s / t)
            q[..., mask] = s / t
            block = torch.where(block == mask, sample_categorical(q, generator), block)
        x = torch.cat([x, block], 1)
    return x


@pytest.mark.parametrize("nucleus_p", [1.0, 0.9])
def test_ddpm_calls_a_time_conditioned_network_at_every_step_of_the_grid(nucleus_p):
    """t_i = 1 - i/T at call i of a block, one call per step while a mask is left, and the
    samples equal the reference loop's (same draws)."""
    T = 8
    cfg = ddpm_cfg(nucleus_p=nucleus_p, num_steps=T)
    spy, reference = Spy(True), Spy(True)
    out = semi_ar_sample(spy, 2, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    expected = reference_ddpm(reference, 2, cfg, seed=0)
    assert torch.equal(out.tokens, expected) and not (out.tokens == MASK).any()
    ts = [t.unique().tolist() for t in spy.ts]
    assert ts == [t.unique().tolist() for t in reference.ts]
    blocks, grid = [], [[1 - i / T] for i in range(T)]
    for t in ts:
        blocks = blocks + [[t]] if t == [1.0] else blocks[:-1] + [blocks[-1] + [t]]
    assert len(blocks) == 2 and all(calls == grid[: len(calls)] for calls in blocks)
    assert grid in blocks  # a block that took all T steps
    # NFE: every call a sequence took part in with a mask left, changed or not
    called = torch.stack(spy.masked).sum(0)
    assert torch.equal(out.nfe_denoise, called) and torch.equal(out.nfe_total, called)


def test_ddpm_reuses_the_prediction_of_a_network_that_ignores_t():
    """Without time conditioning the prediction is reused until a token changes: fewer calls,
    the same samples as calling at every step."""
    cfg = dataclasses.replace(ddpm_cfg(), num_steps=16)
    spy, reference = Spy(False, uses_t=False), Spy(False, uses_t=False)
    out = semi_ar_sample(spy, 2, cfg, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(out.tokens, reference_ddpm(reference, 2, cfg, seed=1))
    assert len(spy.ts) < len(reference.ts)


def test_the_time_conditioning_of_the_objective_reaches_the_sampler():
    """ModelDenoiser (sample_eval via build_sampler, HF generate(), scripts/generate.py) says
    that t reaches a time-conditioned network, and a real one is called at every DDPM step
    with the reference loop's samples."""
    conditioned = tiny_module("bd3lm", 16, "algo.time_conditioning=true")
    assert not module_denoiser(tiny_module("bd3lm"), 16).time_conditioned
    assert not module_denoiser(tiny_module("ar"), 16).time_conditioned
    ids = sampling.TokenIds(BOS_TINY, MASK_TINY, BOS_TINY)
    options = dict(num_steps=16, first_hitting=False, reject_low_entropy=False)
    spec = registry.objective_spec("bd3lm")
    cfg, sample_fn = registry.build_sampler(
        spec, conditioned.algorithm, conditioned.backbone, 16, 8, ids, options
    )
    denoiser = sample_fn.args[0]
    assert denoiser.time_conditioned
    with torch.no_grad():
        out = sample_fn(1, cfg, torch.Generator().manual_seed(2), torch.device("cpu"))
        expected = reference_ddpm(denoiser, 1, cfg, seed=2)
    assert torch.equal(out.tokens, expected)


@pytest.mark.parametrize("first_hitting", [True, False])
def test_both_samplers_draw_from_the_nucleus(first_hitting):
    """p = (0.5, 0.3, 0.2) over tokens 1, 2, 3: nucleus_p = 0.6 keeps token 1 only."""

    class Fixed:
        time_conditioned = False

        def logprobs(self, x, t, num_last, *args, rows=None, **kwargs):
            n = num_last if rows is None else rows.shape[1]
            probs = torch.tensor([1e-9, 0.5, 0.3, 0.2, 1e-9, 1e-30]).expand(x.shape[0], n, V)
            return probs.log()

    cfg = ddpm_cfg(first_hitting=first_hitting, nucleus_p=0.6)
    out = semi_ar_sample(Fixed(), 4, cfg, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert (out.tokens[:, 1:] == 1).all()


def _state(n: int, active=True) -> SequenceState:
    active = torch.full((n,), active, dtype=torch.bool)
    return SequenceState(active, torch.full((n,), 999), ["length"] * n)


def test_low_entropy_rule_needs_more_than_256_generated_tokens():
    """The rule reads the last 256 tokens once more than 256 were generated (the
    reference's `x.shape[1] > 256`, counted after the prompt)."""
    cfg = ddpm_cfg(var_length=True)
    x = torch.full((1, 3 + ENTROPY_WINDOW), 7)
    x[0, 0] = 9
    state = _state(1)
    apply_stop_rules(x[:, : 3 + ENTROPY_WINDOW - 1], 3, 3, state, cfg)  # 255 generated
    apply_stop_rules(x, 3, 3, state, cfg)  # 256
    assert state.reasons == ["length"]
    apply_stop_rules(torch.cat([x, x[:, -1:]], 1), 3, 3, state, cfg)  # 257
    assert state.reasons == ["low_entropy"] and state.lengths.tolist() == [4]


def test_eos_stop_counts_from_the_new_tokens_and_spares_stopped_sequences():
    cfg = ddpm_cfg(var_length=True)
    x = torch.tensor([[0, 3, 4, 1, 3, 0, 3, 3], [0, 3, 4, 1, 3, 3, 0, 0]])  # EOS = 0
    state = _state(2)
    state.stop(1, 3, "eos")  # row 1 stopped at an earlier block
    apply_stop_rules(x, 0, 4, state, cfg)
    assert state.lengths.tolist() == [6, 3] and state.reasons == ["eos", "eos"]
