"""BD3-LM's auxiliary next-token loss on the clean stream (`algo.ar_loss_weight`, NBDiff's
recipe for adapting a causal LM): the training loss is the NELBO plus the weight times the mean
next-token NLL of x_0 read at the clean rows, computed in the same network call; validation
and the per-token terms are the NELBO's alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from algorithms.base import NEG_INF
from algorithms.masked_diffusion import MaskedDiffusion
from models.network import BackboneNetwork
from noise_schedule import LogLinear

V, MASK, L, K = 37, 36, 8, 4


def objective(weight: float) -> MaskedDiffusion:
    return MaskedDiffusion(
        noise=LogLinear(), mask_id=MASK, seq_len=L, block_size=K, cross_attn=True,
        ignore_bos=True, time_conditioning=False, antithetic=True, ar_loss_weight=weight,
    )  # fmt: skip


def losses(network, weight: float, train: bool):
    x0 = torch.randint(0, MASK, (3, L), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(3, L)
    attention_mask[2, 5:] = 0  # padding: left out of both averages
    eps = torch.tensor(1e-3), torch.tensor(1.0)
    generator = torch.Generator().manual_seed(2)
    loss = objective(weight).loss(
        network, x0, attention_mask, *eps, train=train, generator=generator
    )
    return x0, attention_mask, loss


def direct_clean_nll(network, x0, attention_mask) -> torch.Tensor:
    """Mean next-token NLL of x0 from the full (B, 2L, V) logits of the clean half (row L + i
    predicts x0[i + 1]), mask column excluded: the dense oracle."""
    layout = dataclasses.replace(objective(0.0).train_layout, outputs=None)
    tokens = torch.cat([torch.full_like(x0, MASK), x0], dim=1)  # x_t does not reach x_0 rows
    logits = network(tokens, None, layout)[:, L:-1].float()
    logits[..., MASK] = NEG_INF
    nll = F.cross_entropy(logits.flatten(0, 1), x0[:, 1:].flatten(), reduction="none")
    weight = attention_mask[:, 1:].flatten()
    return (nll * weight).sum() / weight.sum()


def test_training_loss_adds_the_weighted_clean_stream_nll(tiny_dit):
    network = BackboneNetwork(tiny_dit(V))
    with torch.no_grad():
        x0, attention_mask, plain = losses(network, 0.0, train=True)
        _, _, with_ar = losses(network, 0.5, train=True)
        expected = plain.loss + 0.5 * direct_clean_nll(network, x0, attention_mask)
    torch.testing.assert_close(with_ar.loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(with_ar.nlls, plain.nlls) and torch.equal(
        with_ar.token_mask, plain.token_mask
    )


def test_validation_and_zero_weight_are_the_nelbo(tiny_dit):
    network = BackboneNetwork(tiny_dit(V))
    with torch.no_grad():
        _, _, plain = losses(network, 0.0, train=False)
        _, _, with_ar = losses(network, 0.5, train=False)
    assert torch.equal(with_ar.loss, plain.loss)


def test_the_clean_stream_needs_the_two_stream_input():
    with pytest.raises(ValueError, match="algo.ar_loss_weight=0.5 reads the clean stream"):
        dataclasses.replace(objective(0.5), cross_attn=False, block_size=L)
