"""scripts/train_judge.py: a few steps of a tiny judge must save a directory that
AutoModelForCausalLM / AutoTokenizer load offline and that metrics.GenerativePerplexity scores a
text with (finite, with the EOS handling it expects), and the study script's pieces."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from conftest import ROOT


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def judge_module():
    return load_script("train_judge")


@pytest.fixture(scope="module")
def tiny_judge(judge_module, tmp_path_factory, data_cache):
    """A 1-layer width-32 judge trained for 3 steps on 64 rows, validated on 64 rows, once in
    memory and once saved -> (dir, result, in-memory model, vocab, valid rows)."""
    vocab, train_rows, valid_rows = judge_module.load_data(["model.length=32"])  # smoke's cache
    opts = judge_module.JudgeOptions(
        steps=3,
        layers=1,
        width=32,
        heads=2,
        context=256,
        positions=256,
        batch_size=2,
        lr=1e-2,
        warmup=1,
    )
    out = str(tmp_path_factory.mktemp("judge") / "judge")
    model, metrics = judge_module.train(
        opts, vocab, train_rows[:64], valid_rows[:64], log=lambda *_: None
    )
    # the public entry point, with the data loading stubbed to the same small slices
    original = judge_module.load_data
    judge_module.load_data = lambda overrides=None: (vocab, train_rows[:64], valid_rows[:64])
    try:
        result = judge_module.train_judge(out, opts, log=lambda *_: None)
    finally:
        judge_module.load_data = original
    assert result["valid_nll"] == pytest.approx(metrics["valid_nll"], rel=1e-6)
    return out, result, model, vocab, valid_rows[:64]


def test_saved_judge_loads_and_scores(tiny_judge):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metrics import GenerativePerplexity

    out, result, _, vocab, _ = tiny_judge
    assert sorted(os.listdir(os.path.dirname(out))) == ["judge"]  # no temporary left behind
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    eos = vocab.tokenizer.eos_token_id
    assert tokenizer.eos_token_id == eos == model.config.eos_token_id == result["eos_token_id"]
    assert model.config.vocab_size == len(tokenizer) == len(vocab.tokenizer)
    assert model.config.n_positions >= 256
    text = "<|endoftext|>ROMEO. What light through yonder window breaks?"
    assert tokenizer(text)["input_ids"] == vocab.tokenizer(text)["input_ids"]
    judge = GenerativePerplexity(out, torch.device("cpu"))
    judge.check()
    nll, count = judge.score(text)
    assert count == len(tokenizer(text)["input_ids"]) - 1  # every target but position 0
    assert math.isfinite(nll) and nll > 0
    # an EOS target is not scored, as the judge is trained
    nll2, count2 = judge.score(text + "<|endoftext|>")
    assert count2 == count and nll2 == pytest.approx(nll, rel=1e-5)
    with open(os.path.join(out, "judge_train.json")) as f:
        assert json.load(f)["valid_ppl"] == pytest.approx(result["valid_ppl"])


def test_saved_weights_are_the_trained_ones(judge_module, tiny_judge):
    """Same seed, same data: the saved weights are the in-memory run's trained weights (a model
    saved before training, or re-initialised on load, would differ) and reproduce its NLL."""
    from transformers import AutoModelForCausalLM

    out, result, trained, vocab, valid_rows = tiny_judge
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    initial = judge_module.build_model(
        judge_module.JudgeOptions(**result["options"]), vocab.tokenizer
    ).state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    moved = [n for n, t in trained.state_dict().items() if not torch.equal(initial[n], t)]
    assert "transformer.wte.weight" in moved and len(moved) > 10
    model = AutoModelForCausalLM.from_pretrained(out)
    nll, count = judge_module.evaluate(model, valid_rows, vocab.tokenizer.eos_token_id, 16)
    assert count == result["valid_tokens"]
    # EOS targets are neither trained on nor scored, as GenerativePerplexity skips them
    eos = vocab.tokenizer.eos_token_id
    assert count == int((valid_rows[:, 1:] != eos).sum()) < valid_rows[:, 1:].numel()
    labels = judge_module.labels_for(valid_rows[:2], eos)
    assert (labels[valid_rows[:2] == eos] == judge_module.IGNORE).all()
    assert torch.equal(labels[valid_rows[:2] != eos], valid_rows[:2][valid_rows[:2] != eos])
    assert nll / count == pytest.approx(result["valid_nll"], rel=1e-5)


def test_existing_output_is_refused(judge_module, tiny_judge):
    out = tiny_judge[0]
    with pytest.raises(FileExistsError):
        judge_module.train_judge(out, judge_module.JudgeOptions(steps=1))


def test_training_windows_are_consecutive_rows(judge_module):
    rows = torch.arange(12).reshape(4, 3)
    windows = judge_module.training_windows(rows, 6)
    assert windows.tolist() == [list(range(0, 6)), list(range(3, 9)), list(range(6, 12))]
    with pytest.raises(ValueError):
        judge_module.training_windows(rows, 5)


def test_study_table_and_target():
    study = load_script("parallel_decoding_study")

    def run(nfe, ppl, ci, entropy=4.0):
        return {
            "gen_ppl_mean_per_sample": ppl,
            "gen_ppl_ci95": ci,
            "nfe_denoise_mean": nfe,
            "nfe_total_mean": nfe + 31,
            "entropy_mean": entropy,
            "num_scored": 64,
            "num_samples": 64,
        }

    runs = {
        "r/exact": run(127, 100.0, 5.0),
        "r/k2": run(64, 108.0, 5.0),
        "r/k4": run(32, 150, 9),
        "r/greedy": run(40, 70.0, 3.0, entropy=3.0),  # low Gen PPL from repetitive text
    }
    names = ["exact", "k2", "k4", "greedy"]
    data = {"num_rows": 64, "gen_ppl_mean": 90.0, "gen_ppl_ci95": 4.0, "entropy_mean": 4.1}
    lines, meets, genuine = study.table(runs, names, [f"r/{n}" for n in names], 128, data)
    assert meets == ["k2", "greedy"] and genuine == ["k2"]
    assert "| k2 | 64.0 | 95.0 | 108.00 +- 5.00 | 4.000 | 1.080 +- 0.074 | 64/64 |" in lines
    assert lines[-1] == "| data (valid rows) | - | - | 90.00 +- 4.00 | 4.100 | - | 64/64 |"
    assert study.point_overrides(study.POINTS["conf0.7"]) == [
        "sampling.tokens_per_step=1",
        "sampling.confidence_threshold=0.7",
        "sampling.entropy_bound=null",
        "sampling.unmask_order=random",
    ]
    assert study.point_overrides(study.POINTS["order_k2"])[3] == "sampling.unmask_order=confidence"
    assert study.point_overrides(study.POINTS["eb1"])[2] == "sampling.entropy_bound=1.0"
