"""The DiT: initialisation, parameter names/order/count of the released checkpoints, EMA."""

from __future__ import annotations

import torch

from conftest import reference_parameter_order
from models.attention import MaskCache
from models.dit import DiT, DiTConfig
from models.ema import EMA


def test_small_model_parameter_count_and_names():
    with torch.device("meta"):
        model = DiT(DiTConfig(vocab_size=50258))  # small: 768 / 128 / 12 blocks / 12 heads
    assert sum(p.numel() for p in model.parameters()) == 169_627_218
    assert [n for n, _ in model.named_parameters()] == reference_parameter_order(12, adaln=True)
    assert set(model.state_dict()) == set(reference_parameter_order(12, True)) | {
        "rotary_emb.inv_freq"
    }


def test_ar_model_has_no_adaln():
    with torch.device("meta"):
        model = DiT(DiTConfig(vocab_size=50258, causal=True, adaln=False))
    assert sum(p.numel() for p in model.parameters()) == 162_246_482
    assert [n for n, _ in model.named_parameters()] == reference_parameter_order(12, adaln=False)


def test_fresh_model_gives_zero_logits(tiny_dit):
    model = tiny_dit(randomized=False)
    x = torch.randint(0, 37, (2, 8))
    full = MaskCache("sdpa").get(None, 8, 8, "cpu")
    logits = model(x, positions=torch.arange(8), mask=full, sigma=torch.zeros(2))
    assert logits.shape == (2, 8, 37)
    assert torch.equal(logits, torch.zeros_like(logits))


def test_output_slice_equals_slicing_full_logits(tiny_dit):
    model = tiny_dit()
    x = torch.randint(0, 37, (2, 8))
    call = dict(positions=torch.arange(8), mask=MaskCache("sdpa").get(None, 8, 8, "cpu"))
    with torch.no_grad():
        full = model(x, **call)
        torch.testing.assert_close(model(x, **call, outputs=slice(-3, None)), full[:, -3:])


def test_rotary_depends_on_positions_not_on_order(tiny_dit):
    """Equal tokens at equal positions give equal outputs under full attention even when the
    second copy is moved: both halves of [x_t ; x_0] share positions 0..L-1."""
    model = tiny_dit()
    x = torch.randint(0, 37, (1, 6))
    mask = MaskCache("sdpa").get(None, 6, 6, "cpu")
    with torch.no_grad():
        a = model(x, positions=torch.arange(6), mask=mask, sigma=torch.zeros(1))
        perm = torch.tensor([3, 1, 5, 0, 2, 4])
        b = model(x[:, perm], positions=perm, mask=mask, sigma=torch.zeros(1))
    torch.testing.assert_close(b, a[:, perm], rtol=1e-5, atol=1e-5)


def test_ema_update_rule_and_keyed_round_trip(tiny_dit):
    model = tiny_dit()
    ema = EMA(model, decay=0.9999)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # n = 1: decay = min(0.9999, 2/11)
    name = "blocks.0.attn_qkv.weight"
    expected = start[name] - (1 - 2 / 11) * (start[name] - (start[name] + 1))
    torch.testing.assert_close(ema.shadow[name], expected)
    state = ema.state_dict()
    other = EMA(tiny_dit(seed=3), decay=0.5)
    other.load_state_dict(state)
    assert other.num_updates == 1 and other.decay == 0.9999
    for n, t in state["shadow"].items():
        assert torch.equal(other.shadow[n], t)
    ema.store(model)
    ema.copy_to(model)
    assert torch.equal(dict(model.named_parameters())[name], ema.shadow[name])
    ema.restore(model)
    assert torch.equal(dict(model.named_parameters())[name], start[name] + 1)
