"""SSD-LM in the runs (`algo=ssdlm`, docs/ssdlm.md): train, sample_eval and generative
perplexity on the smoke config in process, a released-layout checkpoint directory, and the
one-line refusals of what SSD-LM cannot do."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import bad_run, compose_cfg, run_inprocess, save_ssdlm

SAMPLE = "mode=sample_eval"
# the fields of every sample_eval record (sampling/generate.py), SSD-LM's included
RECORD_FIELDS = {
    "index", "seed", "rank", "prompt", "text", "token_ids", "length", "stop_reason", "entropy",
    "gen_ppl", "gen_nll_sum", "gen_num_tokens", "nfe_denoise", "nfe_total",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ssdlm_run(tmp_path_factory, data_cache):
    """The run directory of a 4-step SSD-LM smoke training run (K = 4, rows of 32)."""
    return run_inprocess(tmp_path_factory.mktemp("ssdlm_train"), "algo=ssdlm")


def read_records(run_dir) -> list[dict]:
    with open(f"{run_dir}/samples.jsonl") as f:
        return [json.loads(line) for line in f]


def test_ssdlm_config_defaults():
    cfg = compose_cfg("algo=ssdlm")
    assert cfg.model.backbone == "roberta" and cfg.algo.parameterization == "ssdlm"
    assert cfg.block_size == 4  # the smoke experiment's K wins over ssdlm.yaml's 25
    assert cfg.sampling.first_hitting is False and cfg.algo.top_p == 0.95
    from main import compose

    assert compose(["algo=ssdlm"], "/tmp/bd3lms-tests-unused-run-dir").block_size == 25


def test_table7_tiling_with_the_released_window():
    """roberta-large holds 512 positions, not a multiple of 25: the tiling does not depend on
    it (stride K); L = 1025 is 41 blocks after the BOS."""
    from algorithms.ssdlm import SSDLM
    from sampling import sampler_config

    cfg = sampler_config(SSDLM(block_size=25), 512, 1025, None, {"num_steps": 1000})
    assert cfg.length == 1025 and cfg.block_size == 25 and len(cfg.blocks()) == 41


@pytest.mark.e2e
def test_train_sample_eval_and_gen_ppl(ssdlm_run, judge_dir, tmp_path):
    ckpt = f"{ssdlm_run}/checkpoints/last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "backbone.embed_sum_layer.weight" in state["state_dict"] and "ema" in state
    assert not any(k.startswith("net.") for k in state["state_dict"])  # weights stored once
    assert state["global_step"] == 4
    out = run_inprocess(
        tmp_path / "sample", "algo=ssdlm", SAMPLE, f"eval.checkpoint_path={ckpt}", "algo.T=2",
        f"eval.gen_ppl_eval_model_name_or_path={judge_dir}",
    )  # fmt: skip
    records = read_records(out)
    assert len(records) == 8 and set(records[0]) == RECORD_FIELDS
    for record in records:  # 31 tokens after the BOS: 8 blocks of 4 (the last keeps 3)
        assert record["length"] == 32 and record["nfe_denoise"] == record["nfe_total"] == 2 * 8
        assert record["token_ids"][0] == 0 and record["stop_reason"] == "length"
        assert record["gen_ppl"] > 1 and record["gen_num_tokens"] > 0  # retokenised by the judge
    with open(f"{out}/sample_eval.json") as f:
        summary = json.load(f)
    assert summary["gen_ppl_token_weighted"] > 1 and summary["nfe_denoise_mean"] == 16


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory, data_cache):
    """A tiny random SSD-LM saved in the released layout ("module." prefixes), over the smoke
    tokenizer's vocabulary."""
    import dataloader
    from models.ssdlm import build_network

    vocab = dataloader.get_vocab(compose_cfg("algo=ssdlm").data)
    torch.manual_seed(0)
    cfg = compose_cfg("algo=ssdlm").model
    network = build_network(cfg, vocab.size, 32)
    with torch.no_grad():
        network.timestep_layer.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("released_ssdlm")
    save_ssdlm(network, str(path), module_prefix=True)
    return path


@pytest.mark.e2e
def test_sample_eval_of_a_released_layout_directory(released_dir, tmp_path):
    """The samples are exactly those of the directory's network (models.ssdlm.load_ssdlm)
    sampled directly with the run's seed: the weights come from the files."""
    import dataloader
    from models.ssdlm import load_ssdlm
    from sampling.config import SamplerConfig
    from sampling.ssdlm import SSDLMSamplerOptions, ssdlm_sample

    out = run_inprocess(
        tmp_path / "sample", "algo=ssdlm", SAMPLE, f"eval.checkpoint_path={released_dir}",
        "algo.T=2", "algo.context=all", "model.length=24",
    )  # fmt: skip
    records = read_records(out)
    assert len(records) == 8 and set(records[0]) == RECORD_FIELDS
    assert {r["nfe_denoise"] for r in records} == {2 * 6}  # 23 tokens after the BOS: 6 blocks
    vocab = dataloader.get_vocab(compose_cfg("algo=ssdlm").data)
    cfg = SamplerConfig(length=24, block_size=4, num_steps=2, context=32, bos_id=vocab.bos_id,
                        mask_id=vocab.mask_id, eos_id=vocab.eos_id)  # fmt: skip
    expected = ssdlm_sample(
        load_ssdlm(str(released_dir)), 8, cfg, torch.Generator().manual_seed(1), "cpu",
        options=SSDLMSamplerOptions(context="all"),
    )  # fmt: skip
    assert [r["token_ids"] for r in records] == expected.tokens.tolist()


def test_released_directory_needs_algo_ssdlm_and_its_vocabulary(released_dir, tmp_path):
    message = bad_run(tmp_path, SAMPLE, "algo.T=2", f"eval.checkpoint_path={released_dir}")
    assert "is an SSD-LM checkpoint" in message and "algo=ssdlm" in message
    message = bad_run(
        tmp_path, "algo=ssdlm", SAMPLE, "algo.T=2", f"eval.checkpoint_path={released_dir}",
        "data.tokenizer_name_or_path=gpt2",
    )  # fmt: skip
    assert "vocabulary of 4097 tokens" in message and "gpt2" in message


def test_ssdlm_refuses_a_dit_checkpoint(smoke_checkpoint, tmp_path):
    message = bad_run(
        tmp_path, "algo=ssdlm", SAMPLE, "algo.T=2", f"eval.checkpoint_path={smoke_checkpoint}"
    )
    expected = "is a model.backbone=dit checkpoint (algo=bd3lm); algo=ssdlm runs on model.backbone"
    assert expected in message, message


# (overrides, a fragment of the expected one-line message)
REFUSALS = [
    ([PPL := "mode=ppl_eval"], "mode=ppl_eval: algo=ssdlm has no likelihood bound"),
    ([SAMPLE, "sampling.kv_cache=true"], "sampling.kv_cache=true: algo=ssdlm"),
    ([SAMPLE, "sampling.first_hitting=true"], "sampling.first_hitting=true: algo=ssdlm has no"),
    ([SAMPLE, "sampling.tokens_per_step=2"], "leave sampling.tokens_per_step=1"),
    ([SAMPLE, "sampling.confidence_threshold=0.9"], "sampling.confidence_threshold=0.9"),
    ([SAMPLE, "sampling.eb_gamma=0.5"], "sampling.eb_gamma=0.5"),
    ([SAMPLE, "sampling.unmask_order=confidence"], "sampling.unmask_order=confidence"),
    ([SAMPLE, "sampling.reencode_context=true"], "sampling.reencode_context=true"),
    ([SAMPLE, "sampling.nucleus_p=0.9"], "set algo.top_p instead"),
    ([SAMPLE, "sampling.var_length=true"], "sampling.var_length=true: algo=ssdlm"),
    ([SAMPLE, "sampling.prefix=a"], "sampling.prefix: algo=ssdlm samples without a prompt"),
    (["model.backbone=dit"], "model.backbone=dit: algo=ssdlm runs on model.backbone=roberta"),
    (["algo.parameterization=subs"], "algo.parameterization=subs: algo=ssdlm is"),
    (["block_size=32"], "block_size=32 leaves no context in rows of model.length=32"),
    (["model.attn_backend=flex"], "model.attn_backend=flex: the RoBERTa network"),
    (["training.compile=true"], "training.compile=true"),
    (["training.from_pretrained=/nonexistent.ckpt"], "algo=ssdlm trains from scratch"),
    (["algo.top_p=0"], "algo.top_p=0"),
    (["algo.context=everything"], "algo.context='everything': valid are previous_block, all"),
]


@pytest.mark.parametrize("overrides,expected", REFUSALS, ids=lambda c: str(c))
def test_refusals_are_one_line(tmp_path, data_cache, overrides, expected):
    message = bad_run(tmp_path, "algo=ssdlm", *overrides)
    assert expected in message, message


def test_roberta_backbone_is_ssdlms_only(tmp_path, data_cache):
    message = bad_run(tmp_path, "model.backbone=roberta")
    assert message == "model.backbone=roberta: algo=bd3lm runs on model.backbone=dit or hf_causal"
