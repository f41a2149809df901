"""model=hf_causal through every mode (issue 26, the run's wiring): a pretrained causal LM (a
tiny random Llama saved as a directory, conftest.tiny_llama_dir) trained, evaluated and sampled
by main.py with algo=bd3lm, mdlm and ar; evaluated as it is with eval.checkpoint_path=null (the
"before adaptation" baseline); the run's vocabulary is the model's tokenizer; what such a run
refuses, in one line, before writing anything."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch
import yaml

import dataloader
import settings
from checkpoints import read_any_checkpoint
from conftest import RECORDS, build_module, run_inprocess, save_tiny_causal_lm
from data import options
from utils import UserError

EXPERIMENT = "hf_causal_smoke"  # configs/experiment: context 16, blocks of 4, 4 steps


def compose(*overrides):
    import main

    return main.compose([f"experiment={EXPERIMENT}", *overrides], "/tmp/bd3lms-tests-unused")


def run(run_dir, pretrained, *overrides) -> str:
    """main.py experiment=hf_causal_smoke model.pretrained=`pretrained` OVERRIDES in process."""
    return run_inprocess(
        run_dir, f"model.pretrained={pretrained}", *overrides, experiment=EXPERIMENT
    )


def refused(tmp_path, *overrides, experiment=EXPERIMENT) -> str:
    """The one-line UserError of a run of `overrides`, which must write nothing."""
    run_dir = tmp_path / "bad"
    with pytest.raises(UserError) as err:
        run_inprocess(run_dir, *overrides, experiment=experiment)
    message = str(err.value)
    assert message and "\n" not in message, message
    written = set(os.listdir(run_dir)) - RECORDS if run_dir.exists() else set()
    assert not written, f"a refused run wrote {written}"
    return message


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def resolved_config(run_dir) -> dict:
    with open(os.path.join(run_dir, "config_resolved.yaml")) as f:
        return yaml.safe_load(f)


# ----------------------------------------------------------------------------------------------
# Settings: the model's tokenizer, EMA off
# ----------------------------------------------------------------------------------------------
def test_the_run_takes_the_models_tokenizer_and_no_ema(tiny_llama_dir, data_cache):
    """data.tokenizer_name_or_path records model.pretrained (in the config as it is written);
    the vocabulary is the model's with its mask row; training.ema is 0 unless set; the built
    module trains (the pretrained model loads in eval mode, its dropout off); a DiT run keeps
    its data tokenizer and EMA."""
    cfg = compose(f"model.pretrained={tiny_llama_dir}")
    run, _, _ = settings.check(cfg)
    assert run.data.tokenizer_name_or_path == cfg.data.tokenizer_name_or_path == tiny_llama_dir
    assert run.training.ema == 0
    vocab = dataloader.run_vocab(run.model, run.data)
    assert (vocab.size, vocab.mask_id, vocab.bos_id, vocab.eos_id) == (100, 99, 1, 2)
    assert vocab.tokenizer.convert_ids_to_tokens(99) == vocab.tokenizer.mask_token == "<|mask|>"
    assert vocab.tokenizer.decode(vocab.tokenizer("To be, or not")["input_ids"]) == "To be, or not"
    module = build_module(cfg, vocab.size, vocab.mask_id)
    assert module.ema is None and all(m.training for m in module.backbone.modules())
    ema, _, _ = settings.check(compose(f"model.pretrained={tiny_llama_dir}", "training.ema=0.5"))
    assert ema.training.ema == 0.5
    import main

    dit, _, _ = settings.check(main.compose(["experiment=smoke"], "/tmp/bd3lms-tests-unused"))
    assert dit.data.tokenizer_name_or_path == "shakespeare-bpe-4096" and dit.training.ema > 0


def test_token_caches_are_keyed_by_the_special_ids(tiny_llama_dir, data_cache):
    """Two vocabularies of one tokenizer definition that insert other BOS / EOS ids (a packaged
    model's document token) never share a token cache."""
    run, _, _ = settings.check(compose(f"model.pretrained={tiny_llama_dir}"))
    vocab = dataloader.run_vocab(run.model, run.data)
    opts = options.PipelineOptions.from_cfg(run.data, "valid", 16)
    assert "_tiny-llama0_" in options.cache_name(opts, vocab)  # the directory's name
    other = dataclasses.replace(vocab, bos_id=vocab.eos_id)
    assert options.cache_name(opts, other) != options.cache_name(opts, vocab)


# ----------------------------------------------------------------------------------------------
# The pretrained model as it is
# ----------------------------------------------------------------------------------------------
def test_block_size_one_ppl_eval_of_the_pretrained_model_is_its_nll(
    tmp_path, tiny_llama_dir, data_cache
):
    """ppl_eval with algo=bd3lm block_size=1 and no checkpoint is the causal LM's own NLL
    (transformers, the directory as saved: no mask column) on the validation rows ppl_eval
    reads, position 0 (BOS) without a term."""
    from transformers import AutoModelForCausalLM

    import builders

    overrides = ("block_size=1", "mode=ppl_eval", "eval.checkpoint_path=null")
    run(tmp_path, tiny_llama_dir, *overrides)
    got = read_json(tmp_path / "ppl_eval.json")
    assert got["checkpoint"] is None
    cfg = compose(f"model.pretrained={tiny_llama_dir}", *overrides)
    settings_, hw, plan = settings.check(cfg)
    vocab = dataloader.run_vocab(settings_.model, settings_.data)
    valid = dataloader.get_dataset(settings_.data, vocab, "valid", settings_.model.length)
    loader = builders.build_loader(valid, plan.eval_batch_size, True, settings_, hw, True)
    batches = settings_.trainer.limit_val_batches
    rows = torch.cat([batch["input_ids"] for _, batch in zip(range(batches), loader, strict=False)])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        want = model(rows, labels=rows).loss.item()
    assert got["num_tokens"] == rows[:, 1:].numel()
    assert got["nll"] == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Refusals: one line, nothing written
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["algo=sedd"], "model.backbone=hf_causal: algo=sedd runs on model.backbone=dit"),
        (["algo.time_conditioning=true"], "algo.time_conditioning=true: model.backbone=hf_causal"),
        (["training.compile=true"], "training.compile=true compiles DiT blocks"),
        (["model.attn_backend=flex"], "model.attn_backend=flex cannot train on CPU"),
        (
            ["algo.ar_loss_weight=0.5", "model.clean_attention=block"],
            "algo.ar_loss_weight=0.5 reads next-token logits of the clean stream",
        ),
        (
            ["data.tokenizer_name_or_path=gpt2"],
            "data.tokenizer_name_or_path=gpt2: model.backbone=hf_causal brings its own tokenizer",
        ),
    ],
)
def test_refusals(tmp_path, tiny_llama_dir, data_cache, overrides, expected):
    message = refused(tmp_path, f"model.pretrained={tiny_llama_dir}", *overrides)
    assert message.startswith(expected), message


def test_ssdlm_is_refused(tmp_path, tiny_llama_dir, data_cache):
    """SSD-LM's config puts its RoBERTa in the model group: the pretrained model's keys are
    then another backbone's."""
    message = refused(tmp_path, f"model.pretrained={tiny_llama_dir}", "algo=ssdlm")
    assert message.startswith("model.pretrained is not a known key"), message


def test_refusals_of_the_dit_and_of_a_missing_model(tmp_path, data_cache):
    """The auxiliary AR loss needs a token-causal clean stream (not the DiT's); evaluating
    without a checkpoint needs a pretrained backbone; a model directory that does not exist."""
    message = refused(tmp_path, "algo.ar_loss_weight=0.5", experiment="smoke")
    assert "the clean stream of this model.backbone=dit is block-causal" in message
    message = refused(tmp_path, "mode=ppl_eval", "eval.checkpoint_path=null", experiment="smoke")
    assert message.startswith("eval.checkpoint_path=null: model.backbone=dit is randomly")
    missing = f"model.pretrained={tmp_path}/missing"
    message = refused(tmp_path, missing, "mode=ppl_eval", "eval.checkpoint_path=null")
    assert message.startswith(f"{missing}: no such directory"), message


def test_another_backbones_checkpoint_is_refused(tmp_path, tiny_llama_dir, data_cache):
    """A DiT checkpoint neither fine-tunes nor is evaluated as the pretrained model."""
    from conftest import random_run_checkpoint

    dit = tmp_path / "dit.ckpt"
    random_run_checkpoint(dit)
    pretrained = f"model.pretrained={tiny_llama_dir}"
    message = refused(tmp_path, pretrained, f"training.from_pretrained={dit}")
    assert message == (
        f"training.from_pretrained={dit} is a model.backbone=dit checkpoint (algo=bd3lm); this run "
        "runs on model.backbone=hf_causal"
    )
    message = refused(tmp_path, pretrained, "mode=ppl_eval", f"eval.checkpoint_path={dit}")
    assert message.startswith(f"eval.checkpoint_path={dit} is a model.backbone=dit checkpoint")


def test_gpt2_beyond_its_positions_is_refused(tmp_path, data_cache):
    gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2", n_positions=8)
    message = refused(tmp_path, f"model.pretrained={gpt2}")
    assert message.startswith("model.length=16"), message


# ----------------------------------------------------------------------------------------------
# End to end: train -> ppl_eval -> sample_eval, resume
# ----------------------------------------------------------------------------------------------
def losses(run_dir) -> list[float]:
    import csv
    import glob

    rows = []
    for path in sorted(glob.glob(f"{run_dir}/logs/*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("trainer/loss")]
    return [float(r["trainer/loss"]) for r in rows]


@pytest.mark.e2e
def test_bd3lm_train_ppl_eval_sample_eval(tmp_path, tiny_llama_dir, data_cache):
    """algo=bd3lm (K = 4) with the auxiliary AR loss: the run records the model's tokenizer and
    no EMA; its checkpoint is evaluated (ppl_eval, loaded by name; refused with another
    model.pretrained than it was trained from) and sampled with the KV cache; the auxiliary
    loss adds to the first step's loss (same draws)."""
    plain = run(tmp_path / "plain", tiny_llama_dir, "trainer.max_steps=1")
    trained = run(tmp_path / "train", tiny_llama_dir, "algo.ar_loss_weight=0.5")
    record = resolved_config(trained)
    assert record["data"]["tokenizer_name_or_path"] == tiny_llama_dir
    assert record["training"]["ema"] == 0 and record["model"]["backbone"] == "hf_causal"
    first, with_ar = losses(plain)[0], losses(trained)
    assert len(with_ar) == 4 and all(map(torch.isfinite, torch.tensor(with_ar)))
    assert with_ar[0] > first
    checkpoint = os.path.join(trained, "checkpoints", "last.ckpt")
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["config"]["model"]["pretrained"] == tiny_llama_dir
    assert not any("ema" in k for k in stored) or not stored.get("ema")
    default, _, _ = settings.check(compose("mode=ppl_eval"))  # model.pretrained=smollm2-135m
    with pytest.raises(UserError) as err:
        settings.check_pretrained_source(default, read_any_checkpoint(checkpoint, "key"))
    assert str(err.value) == (
        f"eval.checkpoint_path={checkpoint} was trained from model.pretrained={tiny_llama_dir}, "
        f"not smollm2-135m; set model.pretrained={tiny_llama_dir}"
    )
    evaluated = tmp_path / "eval"
    run(evaluated, tiny_llama_dir, "mode=ppl_eval", f"eval.checkpoint_path={checkpoint}")
    before = tmp_path / "before"
    run(before, tiny_llama_dir, "mode=ppl_eval", "eval.checkpoint_path=null")
    after, base = read_json(evaluated / "ppl_eval.json"), read_json(before / "ppl_eval.json")
    assert after["checkpoint"] == checkpoint and after["nll"] != base["nll"]
    sampled = tmp_path / "sample"
    overrides = ("mode=sample_eval", f"eval.checkpoint_path={checkpoint}", "sampling.kv_cache=true")
    run(sampled, tiny_llama_dir, *overrides)
    summary = read_json(sampled / "sample_eval.json")
    assert summary["num_samples"] == 8 and summary["length_mean"] == 16


@pytest.mark.e2e
@pytest.mark.parametrize(("algo", "kv_cache"), [("ar", "true"), ("mdlm", "false")])
def test_ar_and_mdlm_through_every_mode(tmp_path, tiny_llama_dir, data_cache, algo, kv_cache):
    """algo=ar (the AR fine-tuning baseline) and algo=mdlm train, and their checkpoints and the
    pretrained model itself are evaluated and sampled."""
    trained = run(tmp_path / "train", tiny_llama_dir, f"algo={algo}")
    checkpoint = os.path.join(trained, "checkpoints", "last.ckpt")
    for source in (checkpoint, "null"):
        name = os.path.basename(source)
        run(tmp_path / name, tiny_llama_dir, f"algo={algo}", "mode=ppl_eval",
            f"eval.checkpoint_path={source}")  # fmt: skip
        assert torch.isfinite(torch.tensor(read_json(tmp_path / name / "ppl_eval.json")["nll"]))
    run(tmp_path / "sample", tiny_llama_dir, f"algo={algo}", "mode=sample_eval",
        "eval.checkpoint_path=null", f"sampling.kv_cache={kv_cache}")  # fmt: skip
    assert read_json(tmp_path / "sample" / "sample_eval.json")["num_samples"] == 8


@pytest.mark.e2e
def test_uncached_bd3lm_sampling_draws_the_cached_samples(tmp_path, tiny_llama_dir, data_cache):
    """The uncached sampler (a materialised mask that names its predicate) draws the samples
    of the KV cache."""
    samples = {}
    for kv_cache in ("false", "true"):
        out = tmp_path / kv_cache
        run(out, tiny_llama_dir, "mode=sample_eval", "eval.checkpoint_path=null",
            f"sampling.kv_cache={kv_cache}")  # fmt: skip
        with open(out / "samples.jsonl") as f:
            samples[kv_cache] = [json.loads(line)["token_ids"] for line in f]
    assert len(samples["false"]) == 8 and samples["false"] == samples["true"]


@pytest.mark.e2e
def test_resume_is_bit_identical(tmp_path, tiny_llama_dir, data_cache, caplog):
    """Two steps, then a resumed run to four, end with the weights of four straight steps
    (attention dropout on: its random state resumes too)."""
    straight = run(tmp_path / "straight", tiny_llama_dir)
    resumed = tmp_path / "resumed"
    run(resumed, tiny_llama_dir, "trainer.max_steps=2")
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        run(resumed, tiny_llama_dir)
    assert "resumed at step 2 from" in caplog.text
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4  # 2 + 2 steps
    a = torch.load(os.path.join(straight, "checkpoints", "last.ckpt"), weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
