"""The GPU and cluster paths, exercised on CPU where torch allows: precision choice (simulated
CUDA), the judge in float32 under bf16, released checkpoints in float32, bf16 KV cache,
text8-crop draws on the generator's device, FSDP validation / wrapping / clipping (a simulated
GPU `Hardware`), sweeps, and rank zero under srun."""

from __future__ import annotations

import os
import types

import pytest
import torch
from omegaconf import OmegaConf

import builders
import command_line
import sampling
import settings
from algorithms.base import DoubleLengthCrop
from benchmarks.acceptance_numerics import SameTrajectory
from conftest import build_module, module_denoiser, run_inprocess, tiny_module
from conftest import compose_cfg as compose
from metrics import GenerativePerplexity
from utils import UserError

GPU_HW = settings.Hardware("gpu", 8, 1, "bf16-mixed")
V, MASK, BOS = 41, 40, 0


def fake_cuda(monkeypatch, bf16: bool, count: int = 2):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    native = {"value": bf16}

    def is_bf16_supported(including_emulation=True):
        assert including_emulation is False, "emulated bf16 must not count"
        return native["value"]

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bf16,released,expected",
    [(True, False, "bf16-mixed"), (False, False, "16-mixed"), (True, True, "32-true")],
)
def test_auto_precision_on_a_simulated_gpu(monkeypatch, bf16, released, expected):
    fake_cuda(monkeypatch, bf16)
    hw = settings.resolve_hardware(settings.load(compose()).trainer, released_checkpoint=released)
    assert (hw.accelerator, hw.devices, hw.precision) == ("gpu", 2, expected)
    assert hw.precision_choice and ("float32" in hw.precision_choice) == released
    bf16 = settings.load(compose("trainer.precision=bf16"))
    explicit = settings.resolve_hardware(bf16.trainer, True)
    assert (explicit.precision, explicit.precision_choice) == ("bf16-mixed", None)


def test_precision_refusals():
    with pytest.raises(UserError, match="trainer.precision='fp8': valid are auto"):
        settings.validate(compose("trainer.precision=fp8"))
    with pytest.raises(UserError, match="16-mixed needs a GPU"):
        settings.resolve_hardware(settings.load(compose("trainer.precision=16-mixed")).trainer)
    with pytest.raises(UserError, match="float32_matmul_precision='tf32'"):
        settings.validate(compose("trainer.float32_matmul_precision=tf32"))


def test_released_checkpoints_are_the_float32_default():
    hf = types.SimpleNamespace(format="hf")
    ours = types.SimpleNamespace(format="ours")

    def run(*overrides):
        return settings.load(compose(*overrides))

    assert settings.evaluates_released(run("mode=ppl_eval"), hf)
    assert settings.evaluates_released(run("mode=sample_eval", "algo.backbone=hf_dit"), ours)
    assert not settings.evaluates_released(run("mode=ppl_eval"), ours)
    assert not settings.evaluates_released(run(), None)


def test_judge_scores_in_float32_under_bf16_autocast(judge_dir):
    judge = GenerativePerplexity(str(judge_dir), torch.device("cpu"))
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    exact = judge.score(text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert judge.score(text) == exact
        bf16 = judge._model(torch.tensor([[464, 2068, 7586]])).logits  # what the bug computed
    assert bf16.dtype == torch.bfloat16  # so the equality above is not vacuous


def test_generation_samples_under_autocast_and_scores_outside(judge_dir, data_cache):
    """generate() runs the sampler inside the given autocast and the judge outside it."""
    import dataloader
    from sampling import generate as generation

    vocab = dataloader.get_vocab(OmegaConf.create({"tokenizer_name_or_path": "gpt2",
                                                   "cache_dir": data_cache}))  # fmt: skip
    seen = []

    def sample_fn(batch_size, cfg, generator, device, prompt, valid, progress):
        seen.append(torch.is_autocast_enabled("cpu"))
        tokens = torch.randint(0, 50000, (batch_size, 12), generator=generator)
        length = torch.full((batch_size,), 12)
        zeros = torch.zeros(batch_size, dtype=torch.long)
        return sampling.SampleOutput(tokens, length, length, length, ["length"] * batch_size, zeros)

    judge = GenerativePerplexity(str(judge_dir), torch.device("cpu"))
    scored = []
    original = judge._score
    judge._score = lambda *a: (scored.append(torch.is_autocast_enabled("cpu")), original(*a))[1]
    cfg = sampling.SamplerConfig(length=12, block_size=4, num_steps=1, context=16, bos_id=50256,
                                 mask_id=50257, eos_id=50256)  # fmt: skip
    job = generation.GenerationJob(2, 1, 0, str(data_cache) + "/gen", show_progress=False)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    records = generation.generate(sample_fn, cfg, job, vocab, judge, "cpu", autocast=bf16)
    assert seen == [True] and scored == [False, False]
    for record in records:
        assert (
            record["gen_nll_sum"]
            == GenerativePerplexity(str(judge_dir), "cpu").score(
                vocab.tokenizer.decode(record["token_ids"][1:])  # the generated tokens only
            )[0]
        )


# ----------------------------------------------------------------------------------------------
# bf16 on CPU: the KV cache, and bf16 against float32
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo,block", [("bd3lm", 4), ("ar", 1)])
def test_bf16_kv_cache_equals_recomputation_and_float32_to_tolerance(algo, block):
    """Under CPU bf16 autocast the cache holds bf16 keys/values. Relative to 1 + |log p|
    (log-probabilities reach -16 on this randomised model), cached and uncached
    log-probabilities of the same inputs agree to 0.03 (bf16 rounding of two computation
    orders; measured 0.020), and bf16 agrees with float32 to 0.06 (measured 0.044; bf16 keeps
    8 bits), within and beyond the 16-token window. A cache error would be O(1)."""
    module = tiny_module(algo)
    recorder = SameTrajectory(module_denoiser(module, 16))
    cfg = sampling.SamplerConfig(length=40, block_size=block, num_steps=8, context=16,
                                 bos_id=BOS, mask_id=MASK, eos_id=BOS, kv_cache=True,
                                 reject_low_entropy=False)  # fmt: skip
    sampler = sampling.ar_sample if block == 1 else sampling.semi_ar_sample
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sampler(recorder, 3, cfg, torch.Generator().manual_seed(7), torch.device("cpu"))
    assert not (out.tokens == MASK).any() and recorder.cache.k.dtype == torch.bfloat16
    assert len(recorder.pairs) >= 30
    worst_cache, worst_exact = recorder.worst()
    assert worst_cache < 0.03 and worst_exact < 0.06, (worst_cache, worst_exact)
    assert worst_exact > 0, "bf16 must actually have run"


# ----------------------------------------------------------------------------------------------
# text8-crop: the crop's start is drawn on the generator's device
# ----------------------------------------------------------------------------------------------
def test_double_length_crop_draws_on_the_generators_device(monkeypatch):
    """The step generator lives on the model's device (CUDA in training): the crop's start
    must be drawn there, not on the CPU default."""
    asked = []
    original = torch.randint

    def randint(*args, **kwargs):
        asked.append(kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", randint)
    crop = DoubleLengthCrop(bos_id=2, eos_id=3, insert_special=True)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.arange(16, device="meta")[None].repeat(2, 1)  # rows elsewhere than the generator
    crop(x, torch.ones(2, 16, device="meta"), 8, generator)
    assert asked == [generator.device]  # not x.device
    x = torch.arange(16)[None].repeat(2, 1)
    inputs, target, _ = crop(x, torch.ones(2, 16), 8, None)
    assert asked[-1] == x.device and inputs[0, 0] == 2 and target[0, -1] == 3


# ----------------------------------------------------------------------------------------------
# FSDP (simulated GPU hardware: Lightning has no FSDP on CPU)
# ----------------------------------------------------------------------------------------------
def test_fsdp_validation_refuses_what_cannot_work():
    with pytest.raises(UserError, match="strategy=fsdp needs CUDA GPUs"):
        settings.validate(compose("strategy=fsdp", "training.ema=0"), settings.Hardware(
            "cpu", 1, 1, "32-true"))  # fmt: skip
    with pytest.raises(UserError, match=r"strategy=fsdp with training.ema=0.9999: .*ema=0"):
        settings.validate(compose("strategy=fsdp"), GPU_HW)
    with pytest.raises(UserError, match="gradient_clip_algorithm=value"):
        settings.validate(
            compose("strategy=fsdp", "training.ema=0", "+trainer.gradient_clip_algorithm=value"),
            GPU_HW,
        )
    settings.validate(compose("strategy=fsdp", "training.ema=0"), GPU_HW)  # clip by norm: fine


def test_fsdp_wraps_each_dit_block_as_its_own_unit():
    from models.dit import DiTBlock

    cfg = compose("strategy=fsdp", "training.ema=0")
    strategy = builders.build_strategy(settings.load(cfg), GPU_HW)
    assert isinstance(strategy, builders.L.pytorch.strategies.FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    module = build_module(cfg, vocab_size=V, mask_id=MASK)
    wrapped = policy._run_policy(module, ignored_modules=set(), root_kwargs={})
    units = {name for name, m in module.named_modules() if m in wrapped}
    blocks = {f"backbone.blocks.{i}" for i in range(cfg.model.n_blocks)}
    assert units == blocks  # FSDP wraps the root (embedding, sigma map, output) itself
    assert all(isinstance(m, DiTBlock) for m in wrapped)


def test_fsdp_clips_through_the_wrapped_roots_clip_grad_norm():
    cfg = compose("strategy=fsdp", "training.ema=0")
    module = build_module(cfg, vocab_size=V, mask_id=MASK)
    strategy = builders.build_strategy(settings.load(cfg), GPU_HW)
    calls = []
    strategy.model = types.SimpleNamespace(clip_grad_norm_=lambda norm: calls.append(norm))
    module._trainer = types.SimpleNamespace(strategy=strategy)
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm=None)
    assert calls == [1.0]
    module._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace())  # not FSDP
    with pytest.raises(AttributeError):  # falls through to Lightning's own clipping
        module.configure_gradient_clipping(None, gradient_clip_val=1.0)


# ----------------------------------------------------------------------------------------------
# Sweeps: comma lists of group options, one run directory per point
# ----------------------------------------------------------------------------------------------
def test_group_choices_read_sweep_lists():
    assert command_line.group_values("ar,mdlm") == ["ar", "mdlm"]
    assert command_line.group_values("choice(ar, sedd)") == ["ar", "sedd"]
    assert command_line.group_values("glob(*)") is None
    command_line.check_group_choices(["algo=ar,mdlm", "model=small", "+experiment=smoke,demo"])
    with pytest.raises(UserError, match="algo=nope: unknown; valid are ar, bd3lm, mdlm, sedd"):
        command_line.check_group_choices(["algo=ar,nope"])


# ----------------------------------------------------------------------------------------------
# Rank zero under srun: only global rank 0 writes the run directory's records
# ----------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_only_global_rank_zero_writes_the_resolved_config(tmp_path, smoke_checkpoint, monkeypatch):
    """Under srun every task sees SLURM_PROCID (and no RANK): only task 0 writes the record."""
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for rank, written in (("1", False), ("0", True)):
        monkeypatch.setenv("SLURM_PROCID", rank)
        run_dir = tmp_path / rank
        run_inprocess(run_dir, "mode=ppl_eval", f"eval.checkpoint_path={smoke_checkpoint}")
        assert (run_dir / "config_resolved.yaml").exists() == written


@pytest.mark.e2e
def test_multirun_sweep_gives_each_point_its_run_directory_and_wandb_run(tmp_path, data_cache):
    """`main.py -m algo=ar,mdlm`: two points, each in its own directory with its own (offline)
    wandb run, named after the point's overrides and finished before the next one starts."""
    import subprocess
    import sys

    from conftest import OFFLINE, ROOT

    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "-m", "experiment=smoke",
           "algo=ar,mdlm", "trainer.max_steps=1",
           "trainer.val_check_interval=100", "wandb={project:bd3lms,name:sweep}",
           f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, **OFFLINE, "WANDB_MODE": "offline", "BD3LMS_CACHE": data_cache}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for point, algo in (("0", "ar"), ("1", "mdlm")):
        resolved = OmegaConf.load(tmp_path / point / "config_resolved.yaml")
        assert resolved.algo.name == algo
        assert resolved.block_size == {"ar": 1, "mdlm": resolved.model.length}[algo]  # K used
        assert (tmp_path / point / "checkpoints" / "last.ckpt").exists()
        runs = list((tmp_path / point / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs
        assert f"sweep-algo={algo},".encode() in runs[0].read_bytes()


@pytest.mark.e2e
def test_bf16_mixed_end_to_end_on_cpu(tmp_path, data_cache):
    """trainer.precision=bf16-mixed (CPU autocast) for train, ppl_eval and sample_eval with the
    KV cache: every mode runs and reports its precision."""
    import json

    bf16 = "trainer.precision=bf16-mixed"
    run_inprocess(tmp_path, bf16, "trainer.max_steps=2")
    ckpt = f"eval.checkpoint_path={tmp_path}/checkpoints/last.ckpt"
    run_inprocess(tmp_path / "ppl", bf16, "mode=ppl_eval", ckpt)
    result = json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())
    assert result["precision"] == "bf16-mixed" and 1 < result["ppl"] < 2 * 4097
    run_inprocess(tmp_path / "samples", bf16, "mode=sample_eval", ckpt, "sampling.kv_cache=true",
                  "loader.eval_batch_size=2", "model.length=64")  # fmt: skip
    lines = (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert len(samples) == 2 and all(s["length"] == 64 for s in samples)
    assert all(4096 not in s["token_ids"] for s in samples)
