"""Pins for one-line mutations of scripts/mutants.toml that the rest of the suite let through:
SSD-LM's forward process as the network receives it, its training draws, its projection's
top-1, the encoder's position count; the lm-eval model's context split and
is_greedy's time. Each test names the mutants it kills."""

from __future__ import annotations

import dataclasses
import math
import re
import types

import pytest
import torch
import torch.nn.functional as F

from algorithms.ssdlm import SSDLM
from sampling.ssdlm import top_p_probs

pytestmark = pytest.mark.usefixtures("one_thread")


class InputSpy:
    """An SSD-LM network that records its inputs and predicts nothing (zero logits)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.calls = vocab_size, []

    def __call__(self, context, xt, t_frac):
        self.calls.append((context, xt, t_frac))
        return torch.zeros(xt.shape, requires_grad=True)


def test_ssdlm_training_input_is_the_forward_process():
    """Kills ssdlm-noise-scale, ssdlm-train-times, ssdlm-context-range: x_t =
    sqrt(abar_t) w + sqrt(1 - abar_t) k eps (w = +-k, k = 5), t uniform on 1..T and t / T to
    the network, the context x0[:, :c] with c uniform on min_context..L-K."""
    V, K, T, L = 7, 3, 4, 6
    objective = SSDLM(block_size=K, num_steps=T)
    x0 = torch.randint(V, (64, L), generator=torch.Generator().manual_seed(0))
    net = InputSpy(V)
    objective.loss(net, x0, torch.ones_like(x0), None, None, train=True,
                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    c, t, eps = objective.draw(64, L, V, "cpu", torch.Generator().manual_seed(1))
    ((context, xt, t_frac),) = net.calls
    assert torch.equal(context, x0[:, :c]) and torch.equal(t_frac, t.float() / T)
    assert sorted(t.unique().tolist()) == list(range(1, T + 1))
    f = lambda u: torch.cos(((u / T + 1e-4) / (1 + 1e-4)) * math.pi / 2) ** 2
    abar = (f(t.double()) / f(torch.zeros(1, dtype=torch.float64)))[:, None, None]
    w = 5.0 * (2 * F.one_hot(x0[:, c : c + K], V) - 1)
    expected = abar.sqrt() * w + (1 - abar).sqrt() * 5.0 * eps.double()
    torch.testing.assert_close(xt, expected.float(), rtol=1e-5, atol=1e-5)
    contexts = {objective.draw(1, L, V, "cpu", torch.Generator().manual_seed(s))[0]
                for s in range(30)}  # fmt: skip
    assert contexts == set(range(1, L - K + 1))


def test_ssdlm_projection_keeps_the_top_token():
    """Kills ssdlm-top-p-top1 (top_p = 0 is the argmax, not 0/0). Its inverse CDF is the
    samplers' one (sampling.draws.sample_inverse_cdf), pinned by tests/test_properties.py."""
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    assert torch.equal(top_p_probs(logits, 0.0), torch.tensor([[0.0, 1.0, 0.0]]).double())


def test_ssdlm_network_positions_hold_its_rows_exactly():
    """Kills ssdlm-max-tokens: rows of `length` tokens fit RoBERTa's positions (pad id 1,
    positions from 2) and one more token is refused in one line, not by an index error."""
    from transformers import RobertaForMaskedLM

    from models.ssdlm import SSDLMNetwork, roberta_config

    torch.manual_seed(0)
    config = roberta_config(11, 8, 1, 2, length=6, dropout=0.0)
    net = SSDLMNetwork(RobertaForMaskedLM(config)).eval()
    assert net.max_tokens == 6
    xt = torch.zeros(1, 2, 11)
    with torch.no_grad():
        assert net(torch.zeros(1, 4, dtype=torch.long), xt, torch.ones(1)).shape == (1, 2, 11)
        with pytest.raises(ValueError, match="exceed the 6 positions"):
            net(torch.zeros(1, 5, dtype=torch.long), xt, torch.ones(1))


# ----------------------------------------------------------------------------------------------
# The lm-eval model's estimator, on a harness object without a checkpoint
# ----------------------------------------------------------------------------------------------
class WordTokenizer:
    """GPT-2-like pieces: a word with its leading space; ids by first appearance."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        pieces = re.findall(r"\s?\S+|\s+", text)
        return [self.ids.setdefault(p, len(self.ids)) for p in pieces]


def bare_harness():
    lm_harness = pytest.importorskip("evaluation.lm_harness")
    return object.__new__(lm_harness.BD3LMHarness)


def test_harness_moves_the_contexts_trailing_spaces_to_the_continuation():
    """Kills harness-split-spaces (lm-eval's HF split): "The king " + "said" is scored as
    "The king" + " said", the continuation's token carrying its space."""
    harness = bare_harness()
    harness.tokenizer = WordTokenizer()
    ctx, cont = harness._split("The king ", "said")
    assert ctx == harness._encode("The king") and cont == harness._encode(" said")


@dataclasses.dataclass
class Layout:
    outputs: object = None


def test_is_greedy_reads_a_time_conditioned_network_at_t_1():
    """Kills harness-greedy-time: with every continuation token masked, a time-conditioned
    objective (SEDD, MDLM with time conditioning) is asked at sigma_max (t = 1); one without
    time conditioning gets sigma 0, as in training."""
    harness = bare_harness()
    V, mask = 5, 4
    seen = []

    def network(tokens, sigma, layout):
        seen.append(sigma)
        logits = torch.zeros(int(layout.outputs.sum()), V)
        logits[:, 2] = 1.0
        return logits

    harness.network, harness.mask = network, mask
    x0 = torch.tensor([[0, 1, 2, 2, 3]])
    hidden = torch.tensor([[False, False, True, True, True]])
    cont = torch.tensor([[False, False, True, True, False]])
    for conditioned, level in ((True, 7.5), (False, 0.0)):
        capabilities = types.SimpleNamespace(two_stream=False, time_conditioned=conditioned)
        harness.objective = types.SimpleNamespace(
            capabilities=capabilities, train_layout=Layout(), noise_sigma_max=7.5
        )
        assert harness._greedy(x0, hidden, cont) == [True]
        assert seen[-1].tolist() == [level]
