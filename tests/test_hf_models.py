"""hf: the HF-compatible BD3LM / MDLM wrappers of our DiT: config fields and
defaults, state-dict keys, strict loading of HF directories, forward equivalence with
Diffusion.network, save_pretrained round trips, and the keyed adapter of the no-EOS baselines."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from checkpoints.layout import CheckpointError, adapt_backbone_state, detect_kind
from conftest import randomize_, reference_parameter_order
from hf import BD3LM, MDLM, BD3LMConfig, MDLMConfig
from models.attention import MaskCache
from models.dit import DiT, DiTConfig


def read_json(path):
    with open(path) as f:
        return json.load(f)


TINY = dict(vocab_size=37, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)


def tiny_dit(causal=False, seed=0) -> DiT:
    config = DiTConfig(
        vocab_size=37,
        hidden_size=32,
        cond_dim=16,
        n_blocks=2,
        n_heads=4,
        dropout=0.0,
        causal=causal,
        adaln=not causal,
    )
    return randomize_(DiT(config), seed).eval()


def write_hf_dir(path, config: dict, state: dict) -> str:
    """An HF directory as the released repos lay it out, written without our classes."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors")
    )
    return str(path)


def released_style_bd3lm(tmp_path, dit: DiT, **overrides) -> str:
    config = {
        "model_type": "bd3lm",
        "architectures": ["BD3LM"],
        "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig"},
        "block_size": 4,
        "model_length": 8,
        "cross_attn": True,
        "adaln": True,
        "attn_backend": "sdpa",
        "causal": False,
        "time_conditioning": False,
        "var_min": True,
        "sampling_eps_min": 0.001,
        "sampling_eps_max": 0.999,
        "return_dict": False,
        **TINY,
        **overrides,
    }
    state = {f"backbone.{k}": v for k, v in dit.state_dict().items()}
    state["sampling_eps_min"] = torch.tensor(0.25)
    state["sampling_eps_max"] = torch.tensor(0.75)
    return write_hf_dir(tmp_path / "bd3lm", config, state)


def test_config_defaults_match_the_released_classes():
    c = BD3LMConfig()
    assert (c.model_type, c.block_size, c.vocab_size, c.model_length) == ("bd3lm", 1, 50258, 1024)
    assert (c.cross_attn, c.adaln, c.attn_backend, c.causal) == (True, True, "flex", False)
    assert (c.hidden_dim, c.cond_dim, c.n_blocks, c.n_heads, c.dropout) == (768, 129, 12, 12, 0.1)
    assert (c.time_conditioning, c.var_min) == (False, True)
    assert (c.sampling_eps_min, c.sampling_eps_max) == (1e-3, 0.999)
    assert c.auto_map["AutoModelForMaskedLM"] == "modeling_bd3lm.BD3LM"
    assert c.auto_map["AutoConfig"] == "configuration_bd3lm.BD3LMConfig"
    m = MDLMConfig()
    assert (m.model_type, m.vocab_size, m.cond_dim, m.time_conditioning) == (
        "mdlm",
        50258,
        129,
        False,
    )


def test_state_dict_keys_are_the_released_ones():
    with torch.device("meta"):
        model = BD3LM(BD3LMConfig(**TINY, attn_backend="sdpa"))
        mdlm = MDLM(MDLMConfig(**TINY))
    names = ["backbone." + n for n in reference_parameter_order(2, adaln=True)]
    extra = {"backbone.rotary_emb.inv_freq", "sampling_eps_min", "sampling_eps_max"}
    assert set(model.state_dict()) == set(names) | extra
    assert [n for n, _ in model.named_parameters()] == names
    assert set(mdlm.state_dict()) == set(names) | {"backbone.rotary_emb.inv_freq"}


def test_hf_directory_loads_strictly_and_matches_the_dit(tmp_path):
    dit = tiny_dit()
    path = released_style_bd3lm(tmp_path, dit)
    model = BD3LM.from_pretrained(path)
    assert model.sampling_eps_min.item() == 0.25 and model.sampling_eps_max.item() == 0.75
    x = torch.randint(0, 37, (2, 16))
    masks = MaskCache("sdpa")
    from models.attention import BlockDiffusionMask

    with torch.no_grad():
        got = model(x, torch.zeros(2))
        want = dit(
            x,
            positions=torch.arange(8).repeat(2),
            mask=masks.get(BlockDiffusionMask(8, 4), 16, 16, "cpu"),
            sigma=torch.zeros(2),
            outputs=slice(0, 8),
        )
    assert got.shape == (2, 8, 37)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_flex_config_loads_on_cpu_and_equals_sdpa(tmp_path):
    path = released_style_bd3lm(tmp_path, tiny_dit(), attn_backend="flex")
    flex = BD3LM.from_pretrained(path)
    sdpa = BD3LM.from_pretrained(path, attn_backend="sdpa")
    assert flex.backbone.config.attn_backend == "flex"
    x = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(flex(x, None), sdpa(x, None), rtol=1e-5, atol=1e-5)
        s = x[:, :12]
        torch.testing.assert_close(
            flex(s, None, sample_mode=True), sdpa(s, None, sample_mode=True), rtol=1e-5, atol=1e-5
        )
    flex(x, None).sum().backward()  # with autograd on CPU the same mask runs densely


def test_overrides_and_unknown_overrides(tmp_path):
    path = released_style_bd3lm(tmp_path, tiny_dit())
    model = BD3LM.from_pretrained(path, block_size=8, attn_backend="sdpa")
    assert model.config.block_size == 8
    with pytest.raises(CheckpointError, match="unknown config overrides.*hidden_size"):
        BD3LM.from_pretrained(path, hidden_size=64)


def test_wrong_vocab_or_missing_key_names_the_keys(tmp_path):
    dit = tiny_dit()
    path = released_style_bd3lm(tmp_path, dit)
    with pytest.raises(
        CheckpointError, match=r"backbone.vocab_embed.embedding has shape \(37, 32\)"
    ):
        BD3LM.from_pretrained(path, vocab_size=50)
    state = {f"backbone.{k}": v for k, v in dit.state_dict().items()}
    del state["backbone.blocks.1.attn_out.weight"]  # and no sampling_eps buffers either
    config = read_json(os.path.join(path, "config.json"))
    broken = write_hf_dir(tmp_path / "broken", config, state)
    with pytest.raises(CheckpointError) as err:
        BD3LM.from_pretrained(broken)
    assert "backbone.blocks.1.attn_out.weight" in str(err.value)
    assert "sampling_eps_min" in str(err.value)
    state["backbone.blocks.1.attn_out.weight"] = dit.blocks[1].attn_out.weight
    state["backbone.extra.weight"] = torch.zeros(1)
    broken = write_hf_dir(tmp_path / "broken2", {**config, "var_min": False}, state)
    with pytest.raises(CheckpointError, match=r"unexpected=\[backbone.extra.weight\]"):
        BD3LM.from_pretrained(broken)


def test_inv_freq_is_recomputable_but_checked(tmp_path):
    dit = tiny_dit()
    path = released_style_bd3lm(tmp_path, dit)
    config = read_json(os.path.join(path, "config.json"))
    state = {f"backbone.{k}": v for k, v in dit.state_dict().items()}
    state.pop("backbone.rotary_emb.inv_freq")
    no_freq = write_hf_dir(tmp_path / "nofreq", {**config, "var_min": False}, state)
    BD3LM.from_pretrained(no_freq)
    state["backbone.rotary_emb.inv_freq"] = torch.ones(4)
    bad = write_hf_dir(tmp_path / "badfreq", {**config, "var_min": False}, state)
    with pytest.raises(CheckpointError, match="inv_freq"):
        BD3LM.from_pretrained(bad)


def test_save_pretrained_round_trip_and_config_json(tmp_path):
    model = randomize_(BD3LM(BD3LMConfig(**TINY, model_length=8, block_size=4, return_dict=False)))
    model.save_pretrained(tmp_path / "out")
    config = read_json(tmp_path / "out" / "config.json")
    assert config["model_type"] == "bd3lm"
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_bd3lm.BD3LM"
    assert config["auto_map"]["AutoConfig"] == "configuration_bd3lm.BD3LMConfig"
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    loaded = BD3LM.from_pretrained(str(tmp_path / "out"))
    x = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, None), model.eval()(x, None), rtol=0, atol=0)
    mdlm = randomize_(MDLM(MDLMConfig(**TINY)))
    mdlm.save_pretrained(tmp_path / "mdlm")
    assert read_json(tmp_path / "mdlm" / "config.json")["auto_map"] == {
        "AutoConfig": "configuration_mdlm.MDLMConfig",
        "AutoModelForMaskedLM": "modeling_mdlm.MDLM",
    }
    back = MDLM.from_pretrained(str(tmp_path / "mdlm"))
    with torch.no_grad():
        out = back(x, torch.zeros(2), return_dict=True, output_hidden_states=True)
        torch.testing.assert_close(out.logits, mdlm.eval()(x, torch.zeros(2), return_dict=False))
    assert len(out.hidden_states) == 3  # embeddings + one per block
    with pytest.raises(CheckpointError, match="model_type='mdlm'"):
        BD3LM.from_pretrained(str(tmp_path / "mdlm"))


def test_sample_mode_and_kv_cache():
    model = randomize_(BD3LM(BD3LMConfig(**TINY, model_length=8, block_size=4, return_dict=False)))
    model.eval()
    x = torch.randint(0, 37, (1, 12))
    with torch.no_grad():
        full = model(x, None, sample_mode=True)
        # block-causal: the first two blocks do not see the third
        torch.testing.assert_close(model(x[:, :8], None, sample_mode=True), full[:, :8])
        # the reference's cache protocol: commit clean blocks with store_kv, then denoise
        model.reset_kv_cache(eval_batch_size=1)
        model(x[:, :4], None, sample_mode=True, store_kv=True)
        cached = model(x[:, 4:8], None, sample_mode=True)
        torch.testing.assert_close(cached, full[:, 4:8], rtol=1e-5, atol=1e-5)
        model._kv_cache = None
    assert full.shape == (1, 12, 37)
    with pytest.raises(ValueError, match="store_kv=True needs a KV cache"):
        model(x[:, -4:], None, sample_mode=True, store_kv=True)
    with pytest.raises(ValueError, match="2 \\* model_length"):
        model(x, None)


@pytest.mark.parametrize("kind", ["mdlm", "sedd", "ar"])
def test_keyed_adapter_for_the_noeos_baselines(kind):
    dit = tiny_dit(causal=kind == "ar")
    state = {f"_orig_mod.{k}": v for k, v in dit.state_dict().items()}
    from checkpoints.layout import strip_prefixes

    config, weights = adapt_backbone_state(strip_prefixes(state), kind, n_heads=4)
    assert config.causal == (kind == "ar") and config.adaln == (kind != "ar")
    assert (config.vocab_size, config.hidden_size, config.n_blocks) == (37, 32, 2)
    rebuilt = DiT(config).eval()
    rebuilt.load_state_dict(weights, strict=False)
    x = torch.randint(0, 37, (2, 8))
    mask = MaskCache("sdpa").get(None, 8, 8, "cpu")
    sigma = torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(x, positions=torch.arange(8), mask=mask, sigma=sigma),
            dit(x, positions=torch.arange(8), mask=mask, sigma=sigma),
            rtol=0,
            atol=0,
        )
    other = "mdlm" if kind == "ar" else "ar"
    with pytest.raises(CheckpointError, match="sigma_map"):
        adapt_backbone_state(dict(weights), other, n_heads=4)
    assert detect_kind({}, weights) == ("ar" if kind == "ar" else "mdlm")
    assert detect_kind({"time_conditioning": True}, weights) == ("ar" if kind == "ar" else "sedd")
    assert detect_kind({}, weights, hint="kuleshov-group/sedd-noeos-owt") == "sedd"
    # the parameterization our exports write wins over the flags (a time-conditioned MDLM)
    named = {"time_conditioning": True, "model_type": "mdlm"}
    assert detect_kind({**named, "parameterization": "subs"}, weights) == "mdlm"
    assert detect_kind({**named, "parameterization": "sedd"}, weights) == "sedd"
    assert detect_kind({"parameterization": "subs", "cross_attn": True}, weights) == "bd3lm"
