"""The DiT against an independent implementation written here from the paper's architecture
(DiT blocks with adaLN, rotary embeddings) and the released checkpoints' conventions, with
random weights in every parameter. It pins what a released checkpoint computes: the rotary
frequencies and rotation sign, the timestep features (cosines first), the adaLN order (shift,
scale, gate; the final layer's shift first), the gates and the 1 + scale modulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_
from models.attention import BlockDiffusionMask, MaskCache, dense_mask


def layer_norm(x, weight):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def timestep_features(sigma, dim=256):
    half = dim // 2
    freqs = torch.tensor([math.exp(-math.log(10_000) * j / half) for j in range(half)])
    args = sigma[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotate(x, positions):
    """x: (B, S, H, d); GPT-NeoX rotary, non-interleaved halves, base 10000."""
    d = x.shape[-1]
    inv = torch.tensor([1.0 / 10_000 ** (2 * j / d) for j in range(d // 2)])
    angles = positions.double()[:, None] * inv.double()[None]  # (S, d/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def reference_forward(state: dict, x, sigma, positions, allowed, n_heads, n_blocks):
    """The DiT as the architecture defines it, parameter by parameter."""
    p = lambda name: state[name]  # noqa: E731
    h = p("vocab_embed.embedding")[x]
    t = timestep_features(sigma)
    t = F.linear(t, p("sigma_map.mlp.0.weight"), p("sigma_map.mlp.0.bias"))
    t = F.linear(F.silu(t), p("sigma_map.mlp.2.weight"), p("sigma_map.mlp.2.bias"))
    c = F.silu(t)
    B, S, D = h.shape
    d = D // n_heads
    for i in range(n_blocks):
        q = lambda name, i=i: p(f"blocks.{i}.{name}")  # noqa: E731
        mods = F.linear(c, q("adaLN_modulation.weight"), q("adaLN_modulation.bias"))
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mods.split(D, -1))
        a = layer_norm(h, q("norm1.weight")) * (1 + scale1) + shift1
        qkv = a @ q("attn_qkv.weight").T
        queries, keys, values = (
            qkv[..., j * D : (j + 1) * D].view(B, S, n_heads, d) for j in range(3)
        )
        queries, keys = rotate(queries, positions), rotate(keys, positions)
        scores = torch.einsum("bqhd,bkhd->bhqk", queries, keys) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values).reshape(B, S, D)
        h = h + gate1 * (out @ q("attn_out.weight").T)
        m = layer_norm(h, q("norm2.weight")) * (1 + scale2) + shift2
        m = F.linear(m, q("mlp.0.weight"), q("mlp.0.bias"))
        m = F.linear(F.gelu(m, approximate="tanh"), q("mlp.2.weight"), q("mlp.2.bias"))
        h = h + gate2 * m
    mods = F.linear(c, p("output_layer.adaLN_modulation.weight"),
                    p("output_layer.adaLN_modulation.bias"))  # fmt: skip
    shift, scale = (m[:, None] for m in mods.split(D, -1))  # shift first
    h = layer_norm(h, p("output_layer.norm_final.weight")) * (1 + scale) + shift
    return F.linear(h, p("output_layer.linear.weight"), p("output_layer.linear.bias"))


@pytest.mark.parametrize("sigma", [0.0, 1.7])
def test_dit_equals_an_independent_implementation(tiny_dit, sigma):
    """The BD3-LM training forward ([x_t ; x_0], both halves at positions 0..L-1, the
    block-diffusion mask) with every parameter random."""
    model = randomize_(tiny_dit(vocab_size=37), seed=11, scale=0.3)
    L, K = 8, 2
    x = torch.randint(0, 37, (2, 2 * L), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(L).repeat(2)
    sigmas = torch.full((2,), sigma)
    predicate = BlockDiffusionMask(L, K)
    with torch.no_grad():
        mask = MaskCache("sdpa").get(predicate, 2 * L, 2 * L, "cpu")
        ours = model(x, positions=positions, mask=mask, sigma=sigmas)
        state = {k: v.float() for k, v in model.state_dict().items()}
        allowed = dense_mask(predicate, 2 * L, 2 * L)
        expected = reference_forward(state, x, sigmas, positions, allowed, 4, 2)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
