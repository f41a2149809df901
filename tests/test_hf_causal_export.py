"""Export of a pretrained-causal-LM run (model.backbone=hf_causal) as a plain transformers
causal LM (hf/export_causal.py, through hf.export.export), on a tiny random Llama with a tied
head saved with a tokenizer that has no mask token (the mask row is added as training adds it).

Oracles: transformers' own class reloads the directory with bit-equal logits (the EMA weights,
the tied head included); the project's reader (models.hf_causal.from_pretrained) finds the
mask token and its row (no row added) and gives the same NELBO, bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from algorithms.masked_diffusion import MaskedDiffusion
from conftest import randomize_
from hf.export import export, export_hf
from hf.export_causal import FIELDS, export_causal_lm
from models.hf_causal import HFCausalLM, from_pretrained
from noise_schedule import LogLinear
from utils import UserError

V, L, K = 64, 16, 4


def tokenizer(size: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A saved random Llama (V rows, tied head) and its tokenizer (no mask token)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )  # fmt: skip
    randomize_(model, seed=1, scale=0.3)
    path = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(path)
    tokenizer(V).save_pretrained(path)
    return str(path)


def trained_run(pretrained: str, algo: str = "bd3lm", ema: bool = True):
    """(our checkpoint dict of an hf_causal run, as Diffusion.on_save_checkpoint writes it,
    the backbone with the weights an export takes: EMA where there is one): the pretrained
    model with its mask row, "trained" (new random weights), an EMA away from them."""
    net, _, mask_id = from_pretrained(pretrained, token_shift=algo != "ar")
    assert mask_id == V and net.vocab_size == V + 1  # a new, tied row
    randomize_(net, seed=2, scale=0.3)
    state = {f"backbone.{k}": v.clone() for k, v in net.state_dict().items()}
    state.update(sampling_eps_min=torch.tensor(0.25), sampling_eps_max=torch.tensor(0.75))
    checkpoint = {
        "config": {
            "algo": {"name": algo, "parameterization": "ar" if algo == "ar" else "subs",
                     "cross_attn": algo == "bd3lm"},
            "model": {"backbone": "hf_causal", "pretrained": pretrained, "length": L,
                      "token_shift": True, "clean_attention": "causal"},
            "block_size": K,
        },
        "state_dict": state,
    }  # fmt: skip
    if ema:
        gen = torch.Generator().manual_seed(3)
        shadow = {
            n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen)
            for n, p in net.named_parameters()
        }  # one name for the tied embedding and head, as models.ema keeps it
        checkpoint["ema"] = {"decay": 0.9999, "num_updates": 7, "shadow": shadow}
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(shadow[n])
    return checkpoint, net.eval()


def plain(net: HFCausalLM):
    """The transformers model inside `net`, on transformers' own SDPA attention."""
    model = copy.deepcopy(net.model)
    model.set_attn_implementation("sdpa")
    return model.eval()


def nelbo(net: HFCausalLM, x0: torch.Tensor) -> torch.Tensor:
    """BD3-LM's training NELBO (K = 4) through `net` with fixed draws."""
    algo = MaskedDiffusion(
        noise=LogLinear(), mask_id=V, seq_len=L, block_size=K, cross_attn=True,
        ignore_bos=True, time_conditioning=False, antithetic=True,
    )  # fmt: skip

    def network(tokens, sigma, layout):
        positions = torch.arange(tokens.shape[1] // layout.halves).repeat(layout.halves)
        return net(tokens, positions=positions, mask=layout.mask, outputs=layout.outputs)

    eps = torch.tensor(1e-3), torch.tensor(1.0)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        loss = algo.loss(network, x0, torch.ones_like(x0), *eps, train=True, generator=generator)
    return loss.loss


def tokens(B: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(5))


def test_round_trip_through_transformers_and_the_project(pretrained_dir, tmp_path):
    """Our .ckpt -> hf.export.export -> a directory transformers loads as its own Llama with
    bit-equal logits (EMA weights, tied head); config.json names K, L, the mask id, the token
    shift, the clean-stream attention and the clip interval; the project's reader finds the
    mask token and row and gives the same NELBO."""
    checkpoint, net = trained_run(pretrained_dir)
    ckpt = tmp_path / "run.ckpt"
    torch.save(checkpoint, ckpt)
    out = tmp_path / "hf"
    assert export(str(ckpt), str(out)) == str(out)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert {k: config[k] for k in FIELDS} == {
        "bd3lm_objective": "bd3lm", "bd3lm_block_size": K, "bd3lm_model_length": L,
        "mask_token_id": V, "bd3lm_token_shift": True, "bd3lm_clean_attention": "causal",
    }  # fmt: skip
    assert (config["bd3lm_sampling_eps_min"], config["bd3lm_sampling_eps_max"]) == (0.25, 0.75)
    assert "EMA" in (out / "README.md").read_text()

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__module__.startswith("transformers.models.llama")
    x0 = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(x0).logits, plain(net)(x0).logits)

    back, tok, mask_id = from_pretrained(
        str(out), token_shift=config["bd3lm_token_shift"],
        clean_attention=config["bd3lm_clean_attention"],
    )  # fmt: skip
    assert mask_id == V == tok.mask_token_id and back.vocab_size == V + 1 == len(tok)
    assert tok.padding_side == "left"
    assert torch.equal(nelbo(back.eval(), x0), nelbo(net, x0))


def test_live_weights_and_the_ar_fields(pretrained_dir, tmp_path):
    """scripts/export_hf.py --live exports the live weights, not the EMA; an AR run records
    K = 1 and no token shift (its backbone reads plain next-token logits); no clip buffers,
    no clip fields."""
    checkpoint, ema_net = trained_run(pretrained_dir, algo="ar")
    for key in ("sampling_eps_min", "sampling_eps_max"):
        del checkpoint["state_dict"][key]
    ckpt = tmp_path / "ar.ckpt"
    torch.save(checkpoint, ckpt)
    from scripts.export_hf import main as export_main

    assert export_main([str(ckpt), str(tmp_path / "live"), "--live"]) == 0
    config = json.loads((tmp_path / "live" / "config.json").read_text())
    assert config["bd3lm_objective"] == "ar" and config["bd3lm_block_size"] == 1
    assert config["bd3lm_token_shift"] is False and "bd3lm_sampling_eps_min" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "live")
    live = {k.removeprefix("backbone.model."): v for k, v in checkpoint["state_dict"].items()}
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, live[name]), name
    assert not torch.equal(reloaded.lm_head.weight, ema_net.model.lm_head.weight)


def test_export_of_a_built_backbone(pretrained_dir, tmp_path):
    """export_causal_lm takes a built HFCausalLM and its tokenizer (the mask token added by
    from_pretrained): bit-equal logits after a plain reload; the model's own config object is
    left as it was and its attention switch (the project's function) is not written."""
    net, tok, mask_id = from_pretrained(pretrained_dir)
    before = net.model.config.to_dict()
    fields = {
        "bd3lm_objective": "bd3lm", "bd3lm_block_size": K, "bd3lm_model_length": L,
        "mask_token_id": mask_id, "bd3lm_token_shift": True, "bd3lm_clean_attention": "block",
    }  # fmt: skip
    export_causal_lm(net, tok, str(tmp_path / "hf"), fields)
    assert net.model.config.to_dict() == before
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config._attn_implementation != net.model.config._attn_implementation
    x0 = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(x0).logits, plain(net.eval())(x0).logits)
    with pytest.raises(ValueError, match=r"fields missing \['mask_token_id'\]"):
        fewer = {k: v for k, v in fields.items() if k != "mask_token_id"}
        export_causal_lm(net, tok, str(tmp_path / "x"), fewer)


def test_refusals_are_one_line(pretrained_dir, tmp_path):
    checkpoint, _ = trained_run(pretrained_dir, ema=False)
    ckpt = tmp_path / "run.ckpt"

    def error(mutate) -> str:
        broken = copy.deepcopy(checkpoint)
        mutate(broken)
        torch.save(broken, ckpt)
        with pytest.raises(UserError) as err:
            export(str(ckpt), str(tmp_path / "out"))
        assert len(str(err.value).splitlines()) == 1
        assert not (tmp_path / "out").exists()
        return str(err.value)

    def drop_a_layer(c):
        c["state_dict"] = {k: v for k, v in c["state_dict"].items() if ".layers.1." not in k}

    assert "keys do not match: missing=" in error(drop_a_layer)

    def gone(c):
        c["config"]["model"]["pretrained"] = str(tmp_path / "nowhere")

    assert error(gone).startswith(f"CKPT={ckpt}: model.pretrained={tmp_path / 'nowhere'}: ")

    def ssdlm(c):
        c["config"]["model"]["backbone"] = "roberta"
        c["config"]["algo"] = {"name": "ssdlm", "parameterization": "ssdlm"}

    assert "algo=ssdlm has no HF model" in error(ssdlm)
    with pytest.raises(UserError, match="model.backbone=hf_causal: the hf package's classes"):
        export_hf(checkpoint, str(tmp_path / "dit"))  # the DiT exporter (hf.export.loadable's)


@pytest.mark.e2e
def test_a_trained_run_exports_and_reads_back(tmp_path, tiny_llama_dir, data_cache):
    """A real run (main.py experiment=hf_causal_smoke on conftest's tiny Llama directory, with an
    EMA) -> scripts/export_hf.py -> a directory whose weights are the checkpoint's EMA weights
    (the checkpoint layout H7's run writes: backbone.model.*, EMA names relative to the
    backbone), whose fields are the run's, and which main.py evaluates as a pretrained model
    (model.pretrained=DIR, no checkpoint) to the checkpoint's own ppl_eval NLL."""
    from conftest import run_inprocess
    from scripts.export_hf import main as export_main

    def run(run_dir, pretrained, *overrides) -> str:
        overrides = (f"model.pretrained={pretrained}", *overrides)
        return run_inprocess(run_dir, *overrides, experiment="hf_causal_smoke")

    run(tmp_path / "train", tiny_llama_dir, "training.ema=0.5")
    ckpt = str(tmp_path / "train" / "checkpoints" / "last.ckpt")
    out = tmp_path / "hf"
    assert export_main([ckpt, str(out)]) == 0
    stored = torch.load(ckpt, weights_only=True)
    config = json.loads((out / "config.json").read_text())
    mask_id = config["mask_token_id"]
    assert (config["bd3lm_block_size"], config["bd3lm_model_length"]) == (4, 16)
    assert config["bd3lm_token_shift"] and config["bd3lm_clean_attention"] == "causal"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.get_input_embeddings().num_embeddings == mask_id + 1
    shadow = stored["ema"]["shadow"]
    for name, tensor in reloaded.named_parameters():
        assert torch.equal(tensor, shadow[f"model.{name}"]), name
    assert not torch.equal(shadow["model.lm_head.weight"], stored["state_dict"][
        "backbone.model.lm_head.weight"])  # fmt: skip

    evals = {}  # the checkpoint evaluated with its EMA (the run's training.ema > 0)
    for name, pretrained, source in (
        ("checkpoint", tiny_llama_dir, (f"eval.checkpoint_path={ckpt}", "training.ema=0.5")),
        ("export", str(out), ("eval.checkpoint_path=null",)),
    ):
        run(tmp_path / name, pretrained, "mode=ppl_eval", *source)
        evals[name] = json.loads((tmp_path / name / "ppl_eval.json").read_text())["nll"]
    assert evals["export"] == evals["checkpoint"]
