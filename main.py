"""Hydra entry point: compose and validate the config, build tokenizer, data, module and
trainer, and dispatch on `mode` (train | ppl_eval | sample_eval). No maths here.

Every output goes under the run directory (`hydra.run.dir=DIR`; under `-m`, one directory per
sweep point). Bad input exits with code 2 and one line on stderr, before anything is written.
`compose(overrides, run_dir)` + `run(cfg, run_dir)` is the same run in process (tests, scripts).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import builders
import dataloader
import provenance
import sampling
import settings
from checkpoints import (
    LoadedCheckpoint,
    check_state,
    load_checkpoint_into,
    load_weights,
    ppl_threshold,
    read_any_checkpoint,
    read_checkpoint,
    read_eval_checkpoint,
    trained_length,
)
from sampling import generate
from training_callbacks import LoadingSanityCheck
from utils import (
    UserError,
    atomic_path,
    get_logger,
    global_rank,
    local_copy_if_exists,
    quiet_console,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
GROUPS = ("algo", "model", "data", "noise", "lr_scheduler", "strategy", "experiment")
EVAL_MODES = ("ppl_eval", "sample_eval")
SWEEP_FUNCTION = re.compile(r"^(\w+)\((.*)\)$")  # choice(a,b), range(...), glob(...)
log = get_logger("bd3lms")


def group_values(value: str) -> list[str] | None:
    """The config names a `group=value` override asks for: one name, a comma-separated sweep
    list (`-m algo=ar,mdlm`) or `choice(...)`; None for values that are not names
    (`glob(...)`, `range(...)`, interpolations), which Hydra checks itself."""
    function = SWEEP_FUNCTION.match(value)
    if function:
        if function[1] != "choice":
            return None
        value = function[2]
    if "${" in value:
        return None
    return [v.strip().strip("'\"") for v in value.split(",")]


def check_group_choices(argv: Sequence[str]) -> None:
    """Fail in one line on `group=name` overrides whose config file does not exist (Hydra's own
    message spans many lines)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        choices = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, key)))
        for name in group_values(value) or []:
            if name not in choices:
                raise UserError(f"{key}={name}: unknown; valid are {', '.join(choices)}")


def compose(overrides: Sequence[str], run_dir: str) -> DictConfig:
    """The config that `python main.py OVERRIDES hydra.run.dir=RUN_DIR` runs, for in-process
    runs (tests, scripts): Hydra's compose API, with `${hydra:runtime.output_dir}` = run_dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    check_group_choices(overrides)
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = os.path.abspath(run_dir)
        cfg.hydra.job.name = "main"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def write_json(path: str, payload: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def run_provenance(cfg: DictConfig, hw, run_dir: str, datasets: dict, checkpoint=None) -> dict:
    """provenance.record of this run (the token caches of `datasets`, {split: dataset}, and
    `checkpoint`), also written to RUN_DIR/provenance.json by global rank 0."""
    caches = {split: provenance.cache_name_of(ds) for split, ds in datasets.items()}
    prov = provenance.record(cfg, hw, run_dir=run_dir, data_cache=caches, checkpoint=checkpoint)
    if global_rank() == 0:
        provenance.write(run_dir, prov)
    return prov


def without_provenance(result: dict) -> dict:
    """What the console shows of an output JSON (the record is in the file)."""
    return {k: v for k, v in result.items() if k != "provenance"}


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------
def train(cfg: DictConfig, hw: settings.Hardware, plan: settings.BatchPlan, run_dir: str, _):
    """Train, resuming from checkpointing.resume_ckpt_path when resume_from_ckpt is on and the
    file exists (a local path or an fsspec URL: a remote one is read through a local copy in
    the run directory, removed after the fit)."""
    path = cfg.checkpointing.resume_ckpt_path if cfg.checkpointing.resume_from_ckpt else None
    key = "checkpointing.resume_ckpt_path"
    with local_copy_if_exists(path, key, run_dir) if path else contextlib.nullcontext() as resume:
        fit(cfg, hw, plan, run_dir, resume, path)


def check_resume(module, local: str, path: str) -> None:
    """The resume checkpoint `path` (read from its local copy `local`) holds the module's
    names and shapes, else UserError; logs its step. Nothing of it is kept (Lightning reads it
    again in fit)."""
    key = "checkpointing.resume_ckpt_path"
    try:
        last = read_checkpoint(local, key)
    except UserError as err:  # the message names the local copy; the user gave `path`
        raise UserError(str(err).replace(local, path)) from None
    check_state(module, last, key)  # same model shape?
    log.info("resumed at step %d from %s", last.get("global_step", 0), path)


def fit(cfg, hw, plan, run_dir: str, resume: str | None, resume_path: str | None) -> None:
    """Build and fit; `resume`: the local copy of the checkpoint `resume_path` to resume from,
    None to start afresh (or from training.from_pretrained)."""
    pretrained = None
    key = "training.from_pretrained"
    if resume is None and cfg.training.from_pretrained:
        pretrained = read_any_checkpoint(cfg.training.from_pretrained, key, n_heads(cfg))
    vocab = dataloader.get_vocab(cfg.data)
    bos_eos = (vocab.bos_id, vocab.eos_id)
    module = builders.build_module(cfg, vocab.size, vocab.mask_id, bos_eos=bos_eos)
    length = int(cfg.model.length)
    train_set = dataloader.get_dataset(cfg.data, vocab, "train", length)
    valid_set = dataloader.get_dataset(cfg.data, vocab, "valid", length)
    valid_loader = builders.build_loader(
        valid_set, plan.eval_batch_size, False, cfg.seed, cfg, hw, evaluation=True
    )
    callbacks = []
    if pretrained is not None:
        dataloader.check_vocab_size(vocab, checkpoint_vocab_size(pretrained), key)
        load_checkpoint_into(module, pretrained, key, for_training=True)
        log.info("fine-tuning from %s", cfg.training.from_pretrained)
        threshold = ppl_threshold(cfg.training.from_pretrained, cfg.eval.sanity_ppl_max)
        what = cfg.training.from_pretrained
        callbacks.append(LoadingSanityCheck(valid_loader, threshold, what))
    trainer = builders.build_trainer(cfg, hw, plan, run_dir, fit=True, extra_callbacks=callbacks)
    if resume is not None:
        check_resume(module, resume, resume_path)
    source = cfg.training.from_pretrained if pretrained is not None else None
    datasets = {"train": train_set, "valid": valid_set}
    module.provenance = run_provenance(cfg, hw, run_dir, datasets, source)  # -> checkpoints
    builders.compile_for_training(module, cfg)
    try:
        trainer.fit(
            module,
            builders.build_loader(train_set, plan.batch_size, True, cfg.seed, cfg, hw),
            valid_loader,
            ckpt_path=resume,
            weights_only=True,
        )
    finally:
        builders.finish_logger(trainer)


def n_heads(cfg: DictConfig) -> int:
    return int(cfg.model.n_heads)


def checkpoint_vocab_size(loaded: LoadedCheckpoint) -> int | None:
    """Embedding rows of a checkpoint (its V), or None when it cannot be read."""
    if loaded.dit is not None:
        return loaded.dit.vocab_size
    state = (loaded.raw or {}).get("state_dict", {})
    for name, tensor in state.items():
        if name.endswith("vocab_embed.embedding"):
            return int(tensor.shape[0])
        if name.endswith("embed_sum_layer.weight"):  # SSD-LM: (hidden, V)
            return int(tensor.shape[1])
    return None


def load_for_eval(cfg: DictConfig, loaded: LoadedCheckpoint, seq_len: int | None = None):
    """Tokenizer and module for `eval.checkpoint_path` (any supported format), weights loaded
    strictly by name; EMA weights are swapped in by the caller's mode."""
    key = "eval.checkpoint_path"
    vocab = dataloader.get_vocab(cfg.data)
    if loaded.format == "ssdlm":  # a released SSD-LM directory: the network is loaded
        dataloader.check_vocab_size(vocab, loaded.meta["vocab_size"], key)
        network = loaded.raw["network"]
        return vocab, builders.build_module(
            cfg, vocab.size, vocab.mask_id, seq_len, network=network
        )
    size = checkpoint_vocab_size(loaded)
    if size is not None:
        dataloader.check_vocab_size(vocab, size, key)
    module = builders.build_module(cfg, vocab.size, vocab.mask_id, seq_len)
    if cfg.algo.backbone == "roberta":  # an SSD-LM run's .ckpt: no DiT to compare configs of
        load_weights(module, loaded.raw, key)
    else:
        load_checkpoint_into(module, loaded, key, for_training=False)
    return vocab, module


def ppl_eval(
    cfg: DictConfig, hw: settings.Hardware, plan: settings.BatchPlan, run_dir: str, loaded
):
    path = cfg.eval.checkpoint_path
    vocab, module = load_for_eval(cfg, loaded)
    valid_set = dataloader.get_dataset(cfg.data, vocab, "valid", int(cfg.model.length))
    loader = builders.build_loader(
        valid_set, plan.eval_batch_size, True, cfg.seed, cfg, hw, evaluation=True
    )
    trainer = builders.build_trainer(cfg, hw, plan, run_dir, fit=False)
    module.mc_samples = int(cfg.eval.mc_samples)
    trainer.validate(module, loader, verbose=False)
    if trainer.is_global_zero:
        result = {**module.eval_result, "checkpoint": path, "precision": hw.precision}
        result["provenance"] = run_provenance(cfg, hw, run_dir, {"valid": valid_set}, path)
        threshold = ppl_threshold(path, cfg.eval.sanity_ppl_max)
        if threshold is not None and result["ppl"] > threshold:
            log.warning(
                "perplexity %.2f exceeds %.2f for %s: check the checkpoint, tokenizer "
                "and data (a silent mis-load gives garbage)",
                result["ppl"],
                threshold,
                path,
            )
        write_json(os.path.join(run_dir, "ppl_eval.json"), result)
        print(json.dumps(without_provenance(result)))


def sample_eval(
    cfg: DictConfig, hw: settings.Hardware, plan: settings.BatchPlan, run_dir: str, loaded
):
    fabric = L.Fabric(
        accelerator=hw.accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        strategy="ddp" if hw.world_size > 1 else "auto",
        precision=hw.precision,
    )
    fabric.launch()
    evaluator = builders.build_evaluator(cfg, fabric.device)
    window = trained_length(loaded, cfg.model.length)
    vocab, module = load_for_eval(cfg, loaded, seq_len=window)
    prompts = builders.read_prompts(cfg)
    module.apply_ema()
    module.to(fabric.device).eval()
    ids = sampling.TokenIds(bos=vocab.bos_id, mask=vocab.mask_id, eos=vocab.eos_id)
    try:
        sampler_cfg, sample_fn = sampling.build_sampler(
            module.algorithm, module.backbone, window, int(cfg.model.length), ids,
            settings.sampling_options(cfg), reencode=bool(cfg.sampling.reencode_context),
            network=module.network,
        )  # fmt: skip
    except ValueError as err:
        raise UserError(str(err)) from None
    out_dir = cfg.sampling.logdir or run_dir
    job = generate.GenerationJob(
        batch_size=plan.eval_batch_size,
        num_batches=int(cfg.sampling.num_sample_batches),
        seed=int(cfg.seed),
        out_dir=out_dir,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        prompts=prompts,
        append=cfg.sampling.logdir is not None,
        show_progress=sys.stderr.isatty(),  # no carriage-return bars in slurm logs
    )
    # the sampler runs in the run's precision; the judge scores in float32 outside it
    start = time.perf_counter()
    records = generate.generate(
        sample_fn, sampler_cfg, job, vocab, evaluator, fabric.device, autocast=fabric.autocast
    )
    fabric.barrier()
    if fabric.global_rank == 0:
        prov = run_provenance(cfg, hw, run_dir, {}, cfg.eval.checkpoint_path)
        judge = cfg.eval.gen_ppl_eval_model_name_or_path
        summary = generate.write_summary(out_dir, judge, extra={"provenance": prov})
        seconds, tokens = time.perf_counter() - start, sum(r["length"] for r in records)
        log.info(
            "sampled %d sequences, %d tokens in %.1f s: %.0f tokens/s (rank 0)",
            len(records), tokens, seconds, tokens / max(seconds, 1e-9),
        )  # fmt: skip
        for record in records[:2]:  # without the BOS every sample starts with, one line each
            ids = record["token_ids"]
            text = dataloader.decode(vocab, ids[1:] if ids[:1] == [vocab.bos_id] else ids)
            text = text.strip().replace("\n", " ⏎ ")  # samples.jsonl keeps the text as is
            print(f"--- sample {record['index']} ({record['length']} tokens): {text}")
        print(json.dumps(without_provenance(summary)))


MODES = {"train": train, "ppl_eval": ppl_eval, "sample_eval": sample_eval}


def run(cfg: DictConfig, run_dir: str | None = None) -> None:
    """One run of `cfg` in `run_dir` (default: the Hydra job's output directory). Every check
    that can fail on user input (UserError) runs before anything is written."""
    run_dir = run_dir or HydraConfig.get().runtime.output_dir
    hw, plan = settings.validate(cfg)
    settings.configure_float32_matmul(cfg.trainer)
    if cfg.mode == "sample_eval":
        builders.build_evaluator(cfg, "cpu")  # a judge that cannot be loaded fails first
    loaded = None
    if cfg.mode in EVAL_MODES:
        path = cfg.eval.checkpoint_path
        loaded = read_eval_checkpoint(path, "eval.checkpoint_path", n_heads(cfg), cfg.algo.backbone)
    if cfg.mode == "sample_eval":
        settings.check_sampling(cfg, trained_length(loaded, cfg.model.length))
    if settings.evaluates_released(cfg, loaded):  # float32 unless a precision is set
        hw = settings.resolve_hardware(cfg.trainer, released_checkpoint=True)
    if hw.precision_choice is not None:
        log.info("trainer.precision=auto -> %s (%s)", hw.precision, hw.precision_choice)
    if global_rank() == 0:
        resolved = OmegaConf.to_yaml(cfg, resolve=True)
        if cfg.verbose:
            log.info("resolved config:\n%s", resolved)
        # a sampling.logdir gets it too: scripts/paper_tables.py matches its samples by it
        logdir = cfg.sampling.logdir if cfg.mode == "sample_eval" else None
        for directory in dict.fromkeys(d for d in (run_dir, logdir) if d):
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "config_resolved.yaml")
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                f.write(resolved)
    L.seed_everything(int(cfg.seed), verbose=False)
    MODES[cfg.mode](cfg, hw, plan, run_dir, loaded)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    quiet_console()  # Lightning's tips and known deprecation warnings
    try:
        check_group_choices(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
