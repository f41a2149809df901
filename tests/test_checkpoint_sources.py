"""checkpoints.load_checkpoint_into over every source: HF directories (export round trip, config
disagreements), hub ids offline, our .ckpt, the reference's pickled .ckpt (restricted
unpickler, EMA list mapped by name), plus the loading sanity check."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

from checkpoints import (
    load_checkpoint_into,
    ppl_threshold,
    read_any_checkpoint,
    read_checkpoint,
    sanity_check_perplexity,
)
from conftest import (
    ROOT,
    build_module,
    compose_cfg,
    randomize_,
    reference_parameter_order,
    write_reference_ckpt,
)
from hf import BD3LM, BD3LMConfig
from hf.export import export_hf
from utils import UserError

VOCAB, MASK = 41, 40


def read_json(path):
    with open(path) as f:
        return json.load(f)


def build(*overrides, vocab=VOCAB):
    torch.manual_seed(0)
    return build_module(compose_cfg(*overrides), vocab_size=vocab, mask_id=vocab - 1)


def trained_module(*overrides):
    """Live weights (seed 2) differ from the EMA weights (seed 1); a learned clip interval."""
    module = build(*overrides)
    randomize_(module.backbone, seed=1)
    module.ema.reset(module.backbone)
    randomize_(module.backbone, seed=2)
    if module.var_min:
        module.sampling_eps_min.fill_(0.3)
        module.sampling_eps_max.fill_(0.8)
    return module


def our_checkpoint(module) -> dict:
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def train_logits(module, seed=0):
    """Logits of the network on a [x_t ; x_0] training input (or a plain input)."""
    gen = torch.Generator().manual_seed(seed)
    L = module.algorithm.seq_len
    layout = module.algorithm.train_layout
    S = L * layout.halves
    tokens = torch.randint(0, MASK, (2, S), generator=gen)
    tokens[:, : L // 2] = MASK
    sigma = torch.zeros(2) if module.backbone.sigma_map is not None else None
    module.eval()
    with torch.no_grad():
        return module.network(tokens, sigma, layout)


def backbone_weights(module) -> dict:
    return {n: p.detach().clone() for n, p in module.backbone.named_parameters()}


def test_hf_forward_on_2L_input_equals_diffusion_network():
    module = trained_module()
    hf = BD3LM(
        BD3LMConfig(
            block_size=4,
            model_length=32,
            vocab_size=VOCAB,
            hidden_dim=32,
            cond_dim=16,
            n_blocks=2,
            n_heads=2,
            dropout=0.0,
            attn_backend="sdpa",
            return_dict=False,
        )
    )
    hf.backbone.load_state_dict(module.backbone.state_dict())
    hf.eval()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 64), generator=gen)
    module.eval()
    with torch.no_grad():
        want = module.network(tokens, torch.zeros(2), module.algorithm.train_layout)
        got = hf(tokens, torch.rand(2))  # time conditioning off: sigma is zeroed
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_export_hf_round_trip(tmp_path):
    module = trained_module()
    out = export_hf(our_checkpoint(module), str(tmp_path / "hf"))
    config = read_json(os.path.join(out, "config.json"))
    assert config["model_type"] == "bd3lm" and config["block_size"] == 4
    assert config["cond_dim"] == 16 and config["hidden_dim"] == 32 and config["var_min"]
    assert "auto_map" not in config  # no modeling code is shipped to point at
    assert config["sampling_eps_min"] == pytest.approx(0.3)
    assert BD3LM.from_pretrained(out).sampling_eps_max.item() == pytest.approx(0.8)

    module.apply_ema()
    want = train_logits(module)
    fresh = build()
    load_checkpoint_into(fresh, out, "eval.checkpoint_path", for_training=False)
    assert fresh.sampling_eps_min.item() == pytest.approx(0.3)  # the learned interval
    fresh.apply_ema()
    torch.testing.assert_close(train_logits(fresh), want, rtol=0, atol=0)

    tune = build()
    load_checkpoint_into(tune, out, "training.from_pretrained", for_training=True)
    assert tune.sampling_eps_min.item() == pytest.approx(1e-3)  # the run's interval
    assert tune.ema.num_updates == 0
    torch.testing.assert_close(train_logits(tune), want, rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["mdlm", "ar"])
def test_export_hf_baselines_round_trip(tmp_path, algo):
    module = trained_module(f"algo={algo}")
    out = export_hf(our_checkpoint(module), str(tmp_path / "hf"))
    config = read_json(os.path.join(out, "config.json"))
    assert config["model_type"] == ("mdlm" if algo == "mdlm" else "bd3lm")
    module.apply_ema()
    fresh = build(f"algo={algo}")
    load_checkpoint_into(fresh, out, "eval.checkpoint_path", for_training=False)
    fresh.apply_ema()
    torch.testing.assert_close(train_logits(fresh), train_logits(module), rtol=0, atol=0)


def test_our_ckpt_through_the_entry_point(tmp_path):
    module = trained_module()
    torch.save(our_checkpoint(module), tmp_path / "a.ckpt")
    fresh = build()
    loaded = load_checkpoint_into(fresh, str(tmp_path / "a.ckpt"), "eval.checkpoint_path", False)
    assert loaded.format == "ours"
    torch.testing.assert_close(train_logits(fresh), train_logits(module), rtol=0, atol=0)
    module.apply_ema()
    fresh.apply_ema()
    torch.testing.assert_close(train_logits(fresh), train_logits(module), rtol=0, atol=0)
    other = build("block_size=8")
    with pytest.raises(UserError, match="block_size: checkpoint 4, run 8"):
        load_checkpoint_into(other, str(tmp_path / "a.ckpt"), "eval.checkpoint_path", False)
    load_checkpoint_into(other, str(tmp_path / "a.ckpt"), "training.from_pretrained", True)


class DummyTokenizer:
    def __init__(self):
        self.vocab = {"a": 0}


class Evil:
    """Unpickling this with a plain pickle.load would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def reference_hparams(marker, **algo):
    config = OmegaConf.create(
        {
            "block_size": 4,
            "algo": {"parameterization": "subs", "cross_attn": True, "time_conditioning": False}
            | algo,
            "model": {"length": 32, "n_heads": 2, "hidden_size": 32},
        }
    )
    return {"config": config, "tokenizer": DummyTokenizer(), "payload": Evil(marker)}


def distinct_ema_list(module, adaln=True, seed=7):
    gen = torch.Generator().manual_seed(seed)
    params = dict(module.backbone.named_parameters())
    names = reference_parameter_order(module.backbone.config.n_blocks, adaln=adaln)
    return names, [torch.randn(params[n].shape, generator=gen) + i for i, n in enumerate(names)]


def test_reference_ckpt_with_ema_list_loads_by_name_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    module = trained_module()
    names, ema_list = distinct_ema_list(module)
    path = tmp_path / "ref.ckpt"
    write_reference_ckpt(path, module, ema_list, reference_hparams(marker))
    with pytest.raises(Exception):  # noqa: B017 - the weights_only loader refuses the pickle
        torch.load(path, weights_only=True)

    loaded = read_any_checkpoint(str(path), "eval.checkpoint_path")
    assert loaded.format == "reference" and loaded.kind == "bd3lm"
    assert loaded.meta["n_heads"] == 2 and loaded.meta["block_size"] == 4  # read via stubs
    assert not marker.exists()

    fresh = build()
    load_checkpoint_into(fresh, str(path), "eval.checkpoint_path", for_training=False)
    assert not marker.exists()
    live = backbone_weights(module)
    for name, p in fresh.backbone.named_parameters():
        torch.testing.assert_close(p.detach(), live[name], rtol=0, atol=0)
    for name, tensor in zip(names, ema_list, strict=True):
        torch.testing.assert_close(fresh.ema.shadow[name], tensor, rtol=0, atol=0)
    assert fresh.ema.num_updates == 1000
    assert fresh.sampling_eps_min.item() == pytest.approx(0.3)

    tune = build()
    load_checkpoint_into(tune, str(path), "training.from_pretrained", for_training=True)
    for name, tensor in zip(names, ema_list, strict=True):
        torch.testing.assert_close(dict(tune.backbone.named_parameters())[name], tensor)
    assert tune.sampling_eps_min.item() == pytest.approx(1e-3) and tune.ema.num_updates == 0
    fresh.apply_ema()
    torch.testing.assert_close(train_logits(fresh), train_logits(tune), rtol=0, atol=0)


def test_reference_ckpt_ema_list_is_checked(tmp_path):
    module = trained_module()
    names, ema_list = distinct_ema_list(module)
    write_reference_ckpt(tmp_path / "short.ckpt", module, ema_list[:-1], {})
    with pytest.raises(UserError, match="shadow_params has 29 entries but the model has 30"):
        load_checkpoint_into(build(), str(tmp_path / "short.ckpt"), "k", False)
    swapped = list(ema_list)
    swapped[1], swapped[2] = swapped[2], swapped[1]  # sigma_map.mlp.0.weight <-> .0.bias
    write_reference_ckpt(tmp_path / "swapped.ckpt", module, swapped, {})
    with pytest.raises(UserError, match=r"shadow_params\[1\].*sigma_map.mlp.0.weight"):
        load_checkpoint_into(build(), str(tmp_path / "swapped.ckpt"), "k", False)


def test_reference_ar_ckpt_without_adaln(tmp_path):
    module = trained_module("algo=ar")
    names, ema_list = distinct_ema_list(module, adaln=False)
    assert not any("adaLN" in n or "sigma_map" in n for n in names)
    path = tmp_path / "ar.ckpt"
    write_reference_ckpt(path, module, ema_list, {}, compiled=False)  # kind from the keys
    fresh = build("algo=ar")
    loaded = load_checkpoint_into(fresh, str(path), "eval.checkpoint_path", False)
    assert loaded.kind == "ar"
    torch.testing.assert_close(train_logits(fresh), train_logits(module), rtol=0, atol=0)
    with pytest.raises(UserError, match="AR \\(causal, no adaLN\\)"):
        load_checkpoint_into(build(), str(path), "eval.checkpoint_path", False)


def test_hf_config_disagreements_name_the_key(tmp_path):
    module = trained_module()
    out = export_hf(our_checkpoint(module), str(tmp_path / "hf"))
    with pytest.raises(UserError, match="model.hidden_size: checkpoint 32, run 64") as err:
        load_checkpoint_into(build("model.hidden_size=64"), out, "eval.checkpoint_path", False)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="vocabulary size.*checkpoint 41, run 50"):
        load_checkpoint_into(build(vocab=50), out, "eval.checkpoint_path", False)
    with pytest.raises(UserError, match="block_size: checkpoint 4, run 8"):
        load_checkpoint_into(build("block_size=8"), out, "eval.checkpoint_path", False)
    load_checkpoint_into(build("block_size=8"), out, "training.from_pretrained", True)
    with pytest.raises(UserError, match="algo.time_conditioning"):
        load_checkpoint_into(
            build("algo.time_conditioning=true"), out, "eval.checkpoint_path", False
        )


def test_hub_id_offline_fails_in_one_line():
    with pytest.raises(UserError) as err:
        read_any_checkpoint("kuleshov-group/bd3lm-owt-block_size4", "eval.checkpoint_path")
    message = str(err.value)
    assert "cannot be downloaded offline (HF_HUB_OFFLINE=1)" in message
    assert "download it to a directory and pass its path" in message and "\n" not in message
    with pytest.raises(UserError, match="no such file"):
        read_any_checkpoint("/nonexistent/x.ckpt", "eval.checkpoint_path")
    assert read_checkpoint  # the weights_only reader stays available


def test_sanity_check_perplexity_warns_loudly(caplog):
    module = trained_module()
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, MASK, (2, 32), generator=gen),
            "attention_mask": torch.ones(2, 32),
        }
        for _ in range(2)
    ]
    module.train()
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        ppl = sanity_check_perplexity(module, batches, threshold=1.0, what="test checkpoint")
    assert ppl > 1.0 and "exceeds the sanity threshold" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        again = sanity_check_perplexity(module, batches, threshold=1e9, what="test checkpoint")
    assert again == pytest.approx(ppl) and "exceeds" not in caplog.text
    assert module.training  # the mode is restored
    assert ppl_threshold("kuleshov-group/bd3lm-owt-block_size4") == pytest.approx(41.46)
    assert ppl_threshold("/data/ar-noeos-owt") == pytest.approx(35.08)
    assert ppl_threshold("/my/run", default=99.0) == 99.0


def test_the_hf_offline_flags_are_read_in_one_place(monkeypatch):
    """data.config.hub_offline is the one reading of HF_HUB_OFFLINE / HF_DATASETS_OFFLINE
    (the checkpoint loader and the data sources ask it); scripts and benchmarks only set them."""
    import ast

    from data.config import hub_offline

    readers = []
    for directory, subdirectories, files in os.walk(ROOT):
        skipped = {".venv", ".git", "outputs", "tests", "scripts", "benchmarks"}
        subdirectories[:] = [d for d in subdirectories if d not in skipped]
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(directory, name)
            with open(path) as f:
                text = f.read()
            if "_OFFLINE" not in text:
                continue
            strings = {
                node.value for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
            }  # fmt: skip
            if strings & {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"}:
                readers.append(os.path.relpath(path, ROOT))
    assert readers == [os.path.join("data", "config.py")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "yes")
    assert hub_offline(datasets=True) and not hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "On")
    assert hub_offline()


def test_released_table_quotes_the_papers_table_4():
    """Each released repository's OWT perplexity is its model's row of the paper's Table 4 as
    scripts/paper_numbers.toml records it (stage 1, K = L, is the MDLM objective)."""
    import tomllib

    from checkpoints.layout import RELEASED

    with open(os.path.join(ROOT, "scripts", "paper_numbers.toml"), "rb") as f:
        table4 = {row["label"]: row["paper"] for row in tomllib.load(f)["table4"]["rows"]}
    row = {
        "kuleshov-group/bd3lm-owt-block_size4": "BD3-LM K = 4",
        "kuleshov-group/bd3lm-owt-block_size8": "BD3-LM K = 8",
        "kuleshov-group/bd3lm-owt-block_size16": "BD3-LM K = 16",
        "kuleshov-group/bd3lm-owt-block_size1024-pretrain": "MDLM",
        "kuleshov-group/mdlm-owt": "MDLM",
        "kuleshov-group/mdlm-noeos-owt": "MDLM",
        "kuleshov-group/sedd-noeos-owt": "SEDD",
        "kuleshov-group/ar-noeos-owt": "AR",
    }
    assert {repo: released.owt_ppl for repo, released in RELEASED.items()} == {
        repo: table4[label] for repo, label in row.items()
    }


def test_export_script(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import export_hf as script

    module = trained_module()
    torch.save(our_checkpoint(module), tmp_path / "a.ckpt")
    out = tmp_path / "exported"
    assert script.main([str(tmp_path / "a.ckpt"), str(out)]) == 0
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= files
    capsys.readouterr()
    assert script.main([str(tmp_path / "a.ckpt"), str(out)]) == 2  # refuses to overwrite
    assert capsys.readouterr().err.startswith("error: ")
