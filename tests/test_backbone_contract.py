"""The backbone contract (models/backbone.py): keyword-only calls, the KV cache installed on the
model, the inference snapshot read only where it was installed, and the registry keyed by
`model.backbone` (names, one-line error, FSDP units per backbone)."""

from __future__ import annotations

import glob
import itertools
import os

import pytest
import torch
import yaml

from conftest import ROOT, randomize_
from models.attention import BlockCausalMask, MaskCache
from models.backbone import BACKBONES, Backbone, backbone_spec
from models.dit import DiT, DiTBlock, DiTConfig

V = 37
MODEL_CFG = {
    "hidden_size": 32, "cond_dim": 16, "n_blocks": 2, "n_heads": 4, "dropout": 0.0,
    "adaln": False, "attn_backend": "sdpa",
}  # fmt: skip


def dit(causal: bool = False, seed: int = 0) -> DiT:
    config = DiTConfig(
        vocab_size=V, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0,
        causal=causal, adaln=not causal,
    )  # fmt: skip
    return randomize_(DiT(config), seed=seed, scale=0.3).eval()


def tokens(B: int, S: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def full_mask(S: int):
    return MaskCache("sdpa").get(None, S, S, "cpu")


# ----------------------------------------------------------------------------------------------
# The call
# ----------------------------------------------------------------------------------------------
def test_the_dit_is_a_backbone_with_its_attributes():
    model, ar = dit(), dit(causal=True)
    assert isinstance(model, Backbone) and isinstance(ar, Backbone)
    assert (model.vocab_size, model.attn_backend) == (V, "sdpa")
    assert model.time_conditioned and not ar.time_conditioned


def test_everything_after_the_tokens_is_keyword_only():
    model, x = dit(), tokens(2, 8)
    positions, mask = torch.arange(8), full_mask(8)
    for args in ((positions, mask), (torch.zeros(2), positions, mask)):
        with pytest.raises(TypeError, match="positional"):
            model(x, *args)
    with pytest.raises(TypeError, match="positions"):
        model(x, mask=mask)
    assert model(x, positions=positions, mask=mask).shape == (2, 8, V)


def test_cache_arguments_without_an_installed_cache_are_refused():
    model, x = dit(), tokens(2, 4)
    call = {"positions": torch.arange(4), "mask": full_mask(4)}
    for extra in ({"commit": True}, {"block_valid": torch.ones(2, 4, dtype=torch.bool)}):
        with pytest.raises(ValueError, match="installed KV cache"):
            model(x, **call, **extra)
    with pytest.raises(ValueError, match="installed KV cache"):
        model(x, positions=torch.arange(4), mask=None)


def test_sigma_none_is_sigma_zero_and_ignored_without_adaln():
    x, call = tokens(2, 8), {"positions": torch.arange(8), "mask": full_mask(8)}
    with torch.no_grad():
        for model in (dit(), dit(causal=True)):
            zero = model(x, **call, sigma=torch.zeros(2))
            assert torch.equal(model(x, **call), zero)
        assert not torch.allclose(dit()(x, **call, sigma=torch.full((2,), 2.0)), zero)


# ----------------------------------------------------------------------------------------------
# The installed KV cache
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_installed_cache_gives_the_uncached_logits(causal):
    """Blocks committed one by one through an installed cache, then the last block: its logits
    equal one uncached call over the whole sequence under the block-causal mask (K = 1: AR)."""
    model = dit(causal)
    K, n_blocks, B = (1, 6, 2) if causal else (4, 3, 2)
    S = K * n_blocks
    x = tokens(B, S, seed=3)
    with torch.no_grad():
        mask = MaskCache("sdpa").get(BlockCausalMask(K), S, S, "cpu")
        uncached = model(x, positions=torch.arange(S), mask=mask)
        cache = model.new_kv_cache(B, S, K, "cpu")
        got = []
        with model.inference(cache):
            for b in range(n_blocks):
                span = slice(b * K, (b + 1) * K)
                positions = torch.arange(S)[span]
                got.append(model(x[:, span], positions=positions, mask=None, commit=True))
                cache.advance()
        assert model.kv_cache is None  # removed on leaving the scope
    torch.testing.assert_close(torch.cat(got, dim=1), uncached, rtol=1e-5, atol=1e-5)
    assert cache.num_committed == n_blocks


def test_set_kv_cache_installs_until_removed_and_inference_restores_on_error():
    model = dit()
    cache = model.new_kv_cache(2, 8, 4, "cpu")
    model.set_kv_cache(cache)
    assert model.kv_cache is cache
    with pytest.raises(RuntimeError, match="inside"), model.inference(None, snapshot="s"):
        assert model.kv_cache is None and model.snapshot == "s"
        raise RuntimeError("inside")
    assert model.kv_cache is cache and model.snapshot is None
    model.set_kv_cache(None)
    assert model.kv_cache is None


# ----------------------------------------------------------------------------------------------
# The inference snapshot
# ----------------------------------------------------------------------------------------------
def test_snapshot_caches_equal_the_plain_computation():
    """prepare_inference(): the constant modulation of sigma = 0 equals the modulation computed
    at the call (a given sigma is computed at the call), and the transposed head gives the
    plain projection (bit for bit from 4 rows, to rounding for GEMVs of fewer)."""
    model, x = dit(), tokens(3, 8, seed=5)
    with torch.no_grad():
        model.output_layer.linear.bias.add_(0.3)
        snapshot = model.prepare_inference()
        assert snapshot.head_t.shape == (32, V) and snapshot.head_t.is_contiguous()
        for outputs, sigma in itertools.product((None, slice(7, None)), (None, 1.5)):
            sigma = None if sigma is None else torch.full((3,), sigma)
            call = {"positions": torch.arange(8), "mask": full_mask(8), "outputs": outputs}
            call["sigma"] = sigma
            plain = model(x, **call)
            with model.inference(None, snapshot):
                served = model(x, **call)
            rows = served.shape[0] * served.shape[1]
            tol = 0 if rows >= 4 else 1e-6
            torch.testing.assert_close(served, plain, rtol=tol, atol=tol)
        assert list(snapshot.constant) == [(3, "cpu", False)]
        constant, expected = snapshot.constant[(3, "cpu", False)], model.condition(torch.zeros(3))
        for got, want in zip(
            (*constant.blocks, constant.final), (*expected.blocks, expected.final), strict=True
        ):
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_snapshot_is_read_only_inside_its_scope_and_without_autograd():
    """A stale snapshot (weights changed after it was taken) is what calls inside the scope
    see, while calls outside it, or with autograd on, compute from the current weights."""
    model, x = dit(), tokens(2, 8, seed=6)
    call = {"positions": torch.arange(8), "mask": full_mask(8)}
    snapshot = model.prepare_inference()
    with torch.no_grad():
        with model.inference(None, snapshot):
            before = model(x, **call)
        model.blocks[-1].adaLN_modulation.bias.add_(0.5)
        model.output_layer.linear.weight.mul_(1.5)
        current = model(x, **call)
        with model.inference(None, snapshot):
            torch.testing.assert_close(model(x, **call), before, rtol=0, atol=0)
    assert not torch.allclose(current, before)
    with model.inference(None, snapshot):
        torch.testing.assert_close(model(x, **call).detach(), current, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------
def test_registry_names_and_the_one_line_error():
    assert {"dit", "roberta"} <= set(BACKBONES)
    assert all(name == spec.name for name, spec in BACKBONES.items())
    assert backbone_spec("dit").token_network and not backbone_spec("roberta").token_network
    with pytest.raises(ValueError) as err:
        backbone_spec("unet")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.backbone='unet'")
    assert all(repr(name) in message for name in BACKBONES)


def test_every_model_config_names_a_registered_backbone():
    for path in glob.glob(os.path.join(ROOT, "configs", "model", "*.yaml")):
        with open(path) as f:
            node = yaml.safe_load(f)
        assert node.get("model", node)["backbone"] in BACKBONES, path  # global package: nested


@pytest.mark.parametrize("name,unit,count", [("dit", DiTBlock, 2), ("roberta", "RobertaLayer", 2)])
def test_build_and_fsdp_units_per_backbone(name, unit, count):
    """Each backbone builds from the model keys, and its FSDP units are its layers: one
    instance per transformer layer in the built module."""
    spec = backbone_spec(name)
    model = spec.build({**MODEL_CFG, "attn_backend": "sdpa"}, V, 16, False)
    units = spec.fsdp_units()
    assert [cls.__name__ if isinstance(unit, str) else cls for cls in units] == [unit]
    assert sum(isinstance(m, tuple(units)) for m in model.modules()) == count
    if spec.token_network:
        assert isinstance(model, Backbone) and model.vocab_size == V
    else:
        assert model.vocab_size == V  # SSD-LM's own contract (models/ssdlm.py)


def test_the_dit_build_is_causal_for_ar():
    spec = backbone_spec("dit")
    ar = spec.build({**MODEL_CFG, "attn_backend": "sdpa"}, V, 16, True)
    diffusion = spec.build({**MODEL_CFG, "attn_backend": "sdpa"}, V, 16, False)
    assert ar.config.causal and not ar.time_conditioned
    assert not diffusion.config.causal and diffusion.time_conditioned
