"""The family check of checkpoints.load_checkpoint_into over every source (our .ckpt, an HF
directory written by export_hf, the reference's pickled .ckpt): evaluation refuses a checkpoint
of another objective in one line naming both families and the algo= to use; fine-tuning across
families loads; BD3-LM with K = L pairs with MDLM; the clip interval is copied only when both
sides have one, and the log says which."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from checkpoints import load_checkpoint_into
from conftest import (
    bad_run,
    build_module,
    compose_cfg,
    randomize_,
    reference_parameter_order,
    write_reference_ckpt,
)
from hf.export import export_hf
from utils import UserError

VOCAB = 41
EVAL, TUNE = "eval.checkpoint_path", "training.from_pretrained"
FORMATS = ["ours", "hf", "reference"]
ALGO = {  # overrides of the smoke config (L = 32, K = 4) per family
    "bd3lm": ("algo=bd3lm",),
    "bd3lm_K=L": ("algo=bd3lm", "block_size=32"),
    "mdlm": ("algo=mdlm",),
    "mdlm_time": ("algo=mdlm", "algo.time_conditioning=true"),
    "sedd": ("algo=sedd",),
    "ar": ("algo=ar", "block_size=1"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def build(run):
    torch.manual_seed(0)
    return build_module(compose_cfg(*ALGO[run]), vocab_size=VOCAB, mask_id=VOCAB - 1)


def write(fmt, run, tmp_path):
    """A checkpoint of a random `run` module in format `fmt`; BD3-LM ones carry the learned
    interval [0.3, 0.8]. -> its path."""
    module = build(run)
    randomize_(module.backbone, seed=1)
    module.ema.reset(module.backbone)
    if module.var_min:
        module.sampling_eps_min.fill_(0.3)
        module.sampling_eps_max.fill_(0.8)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / f"{run}.{fmt}"
    if fmt == "ours":
        torch.save(checkpoint, path)
    elif fmt == "hf":
        export_hf(checkpoint, str(path))
    else:
        adaln = module.backbone.config.adaln
        params = dict(module.backbone.named_parameters())
        order = reference_parameter_order(module.backbone.config.n_blocks, adaln)
        config = module.run_config
        hparams = {
            "config": OmegaConf.create(
                {
                    "algo": config["algo"],
                    "model": config["model"],
                    "block_size": config["block_size"],
                }
            )
        }
        write_reference_ckpt(path, module, [params[n].detach() for n in order], hparams)
    return str(path)


def refused(run, path):
    with pytest.raises(UserError) as err:
        load_checkpoint_into(build(run), path, EVAL, for_training=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(EVAL), message
    return message


@pytest.mark.parametrize("fmt", FORMATS)
def test_evaluation_refuses_another_family(fmt, tmp_path):
    bd3lm, mdlm, sedd = (write(fmt, run, tmp_path) for run in ("bd3lm", "mdlm", "sedd"))
    message = refused("mdlm", bd3lm)
    assert "a BD3-LM model with block_size 4 (family bd3lm)" in message
    assert "an MDLM model (family mdlm)" in message
    assert message.endswith("evaluate it with algo=bd3lm block_size=4")
    message = refused("bd3lm", mdlm)
    assert "(family mdlm)" in message and "(family bd3lm)" in message
    assert "evaluate it with algo=mdlm (to fine-tune it into this BD3-LM" in message
    # same shapes and time conditioning: only the family tells them apart
    message = refused("mdlm_time", sedd)
    assert "a SEDD model (family sedd)" in message and "evaluate it with algo=sedd" in message
    # K = L BD3-LM is MDLM's objective, not BD3-LM's with K = 4
    message = refused("bd3lm_K=L", bd3lm)
    assert "block_size 32 = model.length, the MDLM objective (family bd3lm)" in message
    assert message.endswith("algo=bd3lm block_size=4")


@pytest.mark.parametrize("fmt", FORMATS)
def test_fine_tuning_crosses_families(fmt, tmp_path, caplog):
    """MDLM pre-training -> BD3-LM (the paper's recipe): no clip interval in the file, so the
    run's stays; a BD3-LM checkpoint's interval is not carried into fine-tuning."""
    mdlm, bd3lm = write(fmt, "mdlm", tmp_path), write(fmt, "bd3lm", tmp_path)
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        tune = build("bd3lm")
        load_checkpoint_into(tune, mdlm, TUNE, for_training=True)
    assert f"{TUNE}: the checkpoint has no clip interval; the run's [0.001, 1] is used" in (
        caplog.text
    )
    assert tune.sampling_eps_min.item() == pytest.approx(1e-3)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        load_checkpoint_into(build("mdlm"), bd3lm, TUNE, for_training=True)
        load_checkpoint_into(build("bd3lm"), bd3lm, TUNE, for_training=True)
    assert "the checkpoint's clip interval [0.3, 0.8] is not used: this run has none" in caplog.text
    assert "fine-tuning starts from the run's clip interval [0.001, 1], not the checkpoint's " in (
        caplog.text
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_block_bd3lm_pairs_with_mdlm_and_clip_copied_only_when_both_have_it(
    fmt, tmp_path, caplog
):
    one_block, mdlm = write(fmt, "bd3lm_K=L", tmp_path), write(fmt, "mdlm", tmp_path)
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        load_checkpoint_into(build("mdlm"), one_block, EVAL, for_training=False)
    assert "the checkpoint's clip interval [0.3, 0.8] is not used: this run has none" in caplog.text
    assert "(the same objective)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        run = build("bd3lm_K=L")
        load_checkpoint_into(run, mdlm, EVAL, for_training=False)
    assert "the checkpoint has no clip interval; the run's [0.001, 1] is used" in caplog.text
    assert run.sampling_eps_max.item() == pytest.approx(1.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bd3lms"):
        run = build("bd3lm_K=L")
        load_checkpoint_into(run, one_block, EVAL, for_training=False)
    assert f"{EVAL}: the checkpoint's clip interval [0.3, 0.8] is used" in caplog.text
    assert run.sampling_eps_min.item() == pytest.approx(0.3)
    assert run.sampling_eps_max.item() == pytest.approx(0.8)


def test_unrecorded_family_is_refused(tmp_path):
    """A reference .ckpt whose run config is gone: the adaLN weights fit MDLM, BD3-LM and SEDD
    alike (an AR one is known by its keys)."""
    module = build("bd3lm")
    order = reference_parameter_order(2, adaln=True)
    params = dict(module.backbone.named_parameters())
    write_reference_ckpt(tmp_path / "r.ckpt", module, [params[n].detach() for n in order], {})
    message = refused("bd3lm", str(tmp_path / "r.ckpt"))
    assert "does not record its objective" in message


def test_half_a_clip_interval_is_refused(tmp_path):
    path = write("ours", "bd3lm", tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["sampling_eps_max"]
    torch.save(checkpoint, path)
    assert "has sampling_eps_min without its pair" in refused("bd3lm", path)


@pytest.mark.e2e
def test_ppl_eval_of_another_family_is_refused_in_one_line(smoke_checkpoint, tmp_path):
    """The issue's command: an MDLM ppl_eval of a BD3-LM checkpoint."""
    checkpoint = f"eval.checkpoint_path={smoke_checkpoint}"
    line = bad_run(tmp_path, "mode=ppl_eval", "algo=mdlm", "block_size=32", checkpoint)
    assert "(family bd3lm)" in line and "(family mdlm)" in line
    assert line.endswith("evaluate it with algo=bd3lm block_size=4")
