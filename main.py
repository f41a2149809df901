"""Hydra entry point: compose and validate the config, build tokenizer, data, module and
trainer, and dispatch on `mode` (train | ppl_eval | sample_eval). No maths here.

Every output goes under the Hydra run directory (`hydra.run.dir=DIR`). Bad input exits with
code 2 and one line on stderr, before anything is written.
"""

from __future__ import annotations

import json
import os
import sys

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import builders
import dataloader
import samplers
from checkpoints import load_pretrained, load_weights, read_checkpoint
from metrics import unigram_entropy
from utils import UserError, atomic_path, get_logger

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
GROUPS = ("algo", "model", "data", "noise", "lr_scheduler", "strategy", "experiment")
log = get_logger("bd3lms")


def check_group_choices(argv: list[str]) -> None:
    """Fail in one line on `group=name` overrides whose config file does not exist (Hydra's own
    message spans many lines)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        choices = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, key)))
        if value not in choices:
            raise UserError(f"{key}={value}: unknown; valid are {', '.join(choices)}")


def write_json(path: str, payload: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------
def train(cfg: DictConfig, hw: builders.Hardware, plan: builders.BatchPlan, run_dir: str):
    resume = cfg.checkpointing.resume_ckpt_path
    resume = resume if cfg.checkpointing.resume_from_ckpt and os.path.isfile(resume) else None
    pretrained = None
    if resume is None and cfg.training.from_pretrained:
        pretrained = read_checkpoint(cfg.training.from_pretrained, "training.from_pretrained")
    vocab = dataloader.get_vocab(cfg.data)
    module = builders.build_module(cfg, vocab.size, vocab.mask_id)
    if pretrained is not None:
        load_pretrained(module, pretrained)
        log.info("fine-tuning from %s", cfg.training.from_pretrained)
    length = int(cfg.model.length)
    train_set = dataloader.get_dataset(cfg.data, vocab, "train", length)
    valid_set = dataloader.get_dataset(cfg.data, vocab, "valid", length)
    trainer = builders.build_trainer(cfg, hw, plan, run_dir, fit=True)
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.fit(
        module,
        builders.build_loader(train_set, plan.batch_size, True, cfg.seed, cfg, hw),
        builders.build_loader(valid_set, plan.eval_batch_size, False, cfg.seed, cfg, hw),
        ckpt_path=resume,
        weights_only=True,
    )


def load_for_eval(cfg: DictConfig):
    path = cfg.eval.checkpoint_path
    checkpoint = read_checkpoint(path, "eval.checkpoint_path")
    vocab = dataloader.get_vocab(cfg.data)
    module = builders.build_module(cfg, vocab.size, vocab.mask_id)
    load_weights(module, checkpoint, "eval.checkpoint_path")
    return vocab, module


def ppl_eval(cfg: DictConfig, hw: builders.Hardware, plan: builders.BatchPlan, run_dir: str):
    vocab, module = load_for_eval(cfg)
    valid_set = dataloader.get_dataset(cfg.data, vocab, "valid", int(cfg.model.length))
    loader = builders.build_loader(valid_set, plan.eval_batch_size, True, cfg.seed, cfg, hw)
    trainer = builders.build_trainer(cfg, hw, plan, run_dir, fit=False)
    trainer.validate(module, loader, verbose=False)
    if trainer.is_global_zero:
        result = {**module.eval_result, "checkpoint": cfg.eval.checkpoint_path}
        write_json(os.path.join(run_dir, "ppl_eval.json"), result)
        print(json.dumps(result))


def sample_eval(cfg: DictConfig, hw: builders.Hardware, plan: builders.BatchPlan, run_dir: str):
    vocab, module = load_for_eval(cfg)
    device = torch.device("cuda" if hw.accelerator == "gpu" else "cpu")
    module.apply_ema()
    module.to(device).eval()
    sampler_cfg = samplers.SamplerConfig(
        length=int(cfg.model.length),
        block_size=builders.effective_block_size(cfg),
        num_steps=int(cfg.algo.T),
        context=int(cfg.model.length),
        bos_id=vocab.bos_id,
        mask_id=vocab.mask_id,
        first_hitting=bool(cfg.sampling.first_hitting),
        nucleus_p=float(cfg.sampling.nucleus_p),
    )
    generator = torch.Generator().manual_seed(int(cfg.seed))
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=hw.precision.startswith("bf16"))
    records = []
    samples_path = os.path.join(run_dir, "samples.jsonl")
    with open(samples_path, "w") as out:
        for _ in range(int(cfg.sampling.num_sample_batches)):
            with autocast:
                result = module.sample(plan.eval_batch_size, sampler_cfg, generator)
            for ids, nfe in zip(result.tokens.tolist(), result.nfe.tolist(), strict=True):
                record = {
                    "index": len(records),
                    "seed": int(cfg.seed),
                    "text": dataloader.decode(vocab, ids),
                    "token_ids": ids,
                    "length": len(ids),
                    "entropy": unigram_entropy(ids),
                    "nfe_denoise": nfe,
                }
                records.append(record)
                out.write(json.dumps(record) + "\n")
                out.flush()
    summary = {
        "num_samples": len(records),
        "length_mean": sum(r["length"] for r in records) / len(records),
        "entropy_mean": sum(r["entropy"] for r in records) / len(records),
        "nfe_denoise_mean": sum(r["nfe_denoise"] for r in records) / len(records),
        "checkpoint": cfg.eval.checkpoint_path,
    }
    write_json(os.path.join(run_dir, "sample_eval.json"), summary)
    for record in records[:4]:
        print(f"--- sample {record['index']} ({record['length']} tokens)\n{record['text']}")
    print(json.dumps(summary))


MODES = {"train": train, "ppl_eval": ppl_eval, "sample_eval": sample_eval}


def run(cfg: DictConfig) -> None:
    hw = builders.resolve_hardware(cfg.trainer)
    builders.validate(cfg, hw)
    plan = builders.plan_batches(cfg.loader, hw.world_size, cfg.trainer.accumulate_grad_batches)
    run_dir = HydraConfig.get().runtime.output_dir
    L.seed_everything(int(cfg.seed), verbose=False)
    MODES[cfg.mode](cfg, hw, plan, run_dir)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
