"""The glue below main.py: batch arithmetic, LR schedules, config validation, and checkpoint
save -> load -> identical logits."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

import settings
from checkpoints import load_weights, read_checkpoint
from conftest import build_module, compose_cfg, module_denoiser, randomize_
from diffusion import OptimSettings, lr_multiplier
from utils import UserError


def loader(global_bs, batch_size=None, eval_global=None, eval_batch_size=None):
    return OmegaConf.create(
        {
            "global_batch_size": global_bs,
            "eval_global_batch_size": eval_global or global_bs,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
        }
    )


@pytest.mark.parametrize(
    "global_bs,batch,world,expected",
    [
        (512, 16, 8, (16, 64, 4)),  # OWT scripts: 16 x 8 GPUs x 4
        (512, 64, 4, (64, 128, 2)),  # LM1B BD3-LM: 64 x 4 x 2
        (512, 128, 4, (128, 128, 1)),
        (512, None, 4, (128, 128, 1)),  # null = ceil(global / world)
        (32, None, 1, (32, 32, 1)),
    ],
)
def test_batch_arithmetic(global_bs, batch, world, expected):
    plan = settings.plan_batches(loader(global_bs, batch), world)
    assert (plan.batch_size, plan.eval_batch_size // 1, plan.accumulate)[0::2] == expected[0::2]
    assert plan.batch_size * world * plan.accumulate == global_bs


@pytest.mark.parametrize("global_bs,batch,world", [(10, 4, 1), (512, 16, 3), (100, 30, 2)])
def test_batch_arithmetic_refuses_inexact_splits(global_bs, batch, world):
    with pytest.raises(UserError, match="loader.global_batch_size"):
        settings.plan_batches(loader(global_bs, batch), world)


def test_explicit_accumulation_must_agree():
    assert settings.plan_batches(loader(64, 8), 2, accumulate=4).accumulate == 4
    with pytest.raises(UserError, match="accumulate_grad_batches"):
        settings.plan_batches(loader(64, 8), 2, accumulate=2)


def test_lr_schedules():
    warm = lr_multiplier(OptimSettings(lr_schedule="constant_warmup", warmup_steps=2500))
    assert [warm(s) for s in (0, 1250, 2500, 10_000)] == [0.0, 0.5, 1.0, 1.0]
    assert lr_multiplier(OptimSettings(lr_schedule="constant"))(7) == 1.0
    cos = lr_multiplier(OptimSettings(lr=1e-3, lr_schedule="cosine_decay_warmup", max_steps=1000))
    assert cos(0) * 1e-3 == pytest.approx(1e-6)
    assert cos(100) == pytest.approx(1.0)  # end of the 0.1 max_steps warm-up
    assert cos(550) * 1e-3 == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert cos(1000) * 1e-3 == pytest.approx(1e-6) and cos(5000) * 1e-3 == pytest.approx(1e-6)
    assert cos(325) * 1e-3 == pytest.approx(
        1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi / 4))
    )


def test_hardware_defaults_on_cpu():
    hw = settings.resolve_hardware(compose_cfg().trainer)
    if not torch.cuda.is_available():
        assert (hw.accelerator, hw.devices, hw.precision) == ("cpu", 1, "32-true")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["block_size=3"], "block_size=3"),
        (["mode=evaluate"], "mode="),
        (["model.attn_backend=flash_attn"], "model.attn_backend=flash_attn"),
        (["mode=sample_eval", "sampling.nucleus_p=1.5"], "sampling.nucleus_p"),
        (["mode=sample_eval", "algo=mdlm", "sampling.kv_cache=true"], "sampling.kv_cache"),
        (["mode=sample_eval", "sampling.prefix=a", "sampling.prefix_file=b"], "not both"),
        (["model.attn_backend=nope"], "model.attn_backend"),
    ],
)
def test_validate_rejects(overrides, match):
    cfg = compose_cfg(*overrides)
    with pytest.raises(UserError, match=match):
        settings.validate(cfg, settings.resolve_hardware(cfg.trainer))


@pytest.mark.parametrize("algo", ["bd3lm", "mdlm", "ar"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, algo):
    cfg = compose_cfg(f"algo={algo}")
    torch.manual_seed(0)
    module = build_module(cfg, vocab_size=41, mask_id=40)
    randomize_(module.backbone, seed=1)
    module.ema.reset(module.backbone)
    randomize_(module.backbone, seed=2)  # live weights differ from the EMA weights
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)

    fresh = build_module(cfg, vocab_size=41, mask_id=40)
    load_weights(fresh, read_checkpoint(str(path), "eval.checkpoint_path"), "eval.checkpoint_path")
    x = torch.randint(0, 40, (2, 32))
    t = torch.full((2,), 0.5)

    def logprobs(m):
        return module_denoiser(m, 32).logprobs(x, t, 32, None, None)

    with torch.no_grad():
        torch.testing.assert_close(logprobs(fresh), logprobs(module), rtol=0, atol=0)
        module.apply_ema()
        fresh.apply_ema()
        torch.testing.assert_close(logprobs(fresh), logprobs(module), rtol=0, atol=0)


def test_a_run_without_ema_evaluates_the_checkpoints_ema_weights(tmp_path):
    """training.ema=0 at evaluation (a pretrained backbone's default) still evaluates the EMA
    weights a checkpoint holds, not its live ones."""
    torch.manual_seed(0)
    module = build_module(compose_cfg(), vocab_size=41, mask_id=40)
    randomize_(module.backbone, seed=1)
    module.ema.reset(module.backbone)
    randomize_(module.backbone, seed=2)  # live weights differ from the EMA weights
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    fresh = build_module(compose_cfg("training.ema=0"), vocab_size=41, mask_id=40)
    assert fresh.ema is None
    load_weights(fresh, checkpoint, "eval.checkpoint_path")
    for name, tensor in fresh.backbone.named_parameters():
        assert torch.equal(tensor, module.ema.shadow[name]), name


def test_loading_a_mismatched_checkpoint_names_the_keys(tmp_path):
    small = build_module(compose_cfg(), vocab_size=41, mask_id=40)
    torch.save({"state_dict": small.state_dict()}, tmp_path / "a.ckpt")
    other = build_module(compose_cfg("model.n_blocks=3"), vocab_size=41, mask_id=40)
    with pytest.raises(UserError, match=r"missing=\[backbone.blocks.2"):
        load_weights(other, read_checkpoint(str(tmp_path / "a.ckpt"), "k"), "k")
    wider = build_module(compose_cfg(), vocab_size=50, mask_id=49)
    with pytest.raises(UserError, match="vocab_embed.embedding has shape"):
        load_weights(wider, read_checkpoint(str(tmp_path / "a.ckpt"), "k"), "k")


def test_sanity_check_reads_at_most_max_rows(monkeypatch):
    """The fine-tuning sanity check is bounded in rows, whatever the batch size."""
    from checkpoints import sanity_check_perplexity
    from conftest import tiny_module

    module = tiny_module("bd3lm", 32)
    batches = [{"input_ids": torch.randint(0, 40, (3, 32)), "attention_mask": torch.ones(3, 32)}]
    rows, loss = [], module.algorithm.loss

    def counted(network, x0, *args, **kwargs):
        rows.append(x0.shape[0])
        return loss(network, x0, *args, **kwargs)

    monkeypatch.setattr(module.algorithm, "loss", counted)
    sanity_check_perplexity(module, batches * 3, None, "test", max_rows=4)
    assert rows == [3, 1]
