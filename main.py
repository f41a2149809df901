"""Hydra entry point: compose and check the config, build tokenizer, objective, data, module and
trainer, and dispatch on `mode` (train | ppl_eval | sample_eval). No maths here.

Every output goes under the run directory (`hydra.run.dir=DIR`; under `-m`, one directory per
sweep point). Bad input exits with code 2 and one `error:` line on stderr (also in the run's
main.log), before anything is written: the command line's group options and keys are checked
before torch and Lightning are imported (command_line.py), every other check before the run
writes its first file (`run`). The config becomes typed settings (settings.RunSettings) once;
below this module nothing reads it. `compose(overrides, run_dir)` + `run(cfg, run_dir)` is the
same run in process (tests, scripts).
"""

# ruff: noqa: E402 (the heavy imports come after the command-line check, see __main__ below)
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import warnings
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from command_line import check_command_line, command_line_keys, compose, fail
from utils import (
    UserError,
    atomic_path,
    get_logger,
    global_rank,
    local_copy_if_exists,
    quiet_console,
)

EVAL_MODES = ("ppl_eval", "sample_eval")
log = get_logger("bd3lms")


if __name__ == "__main__":  # a bad command line fails in a second, not after torch loads
    try:
        check_command_line(sys.argv[1:])
    except UserError as err:
        fail(err)

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

import builders
import dataloader
import provenance
import registry
import sampling
import settings
from checkpoints import (
    LoadedCheckpoint,
    check_backbone,
    check_state,
    load_checkpoint_into,
    ppl_threshold,
    read_any_checkpoint,
    read_checkpoint,
    trained_length,
)
from sampling import generate
from training_callbacks import LoadingSanityCheck, Preemption

__all__ = ["compose", "main", "run"]


@dataclasses.dataclass(frozen=True)
class Job:
    """A checked run, what its mode works with: the typed settings, the resolved config as it
    is recorded (config_resolved.yaml, checkpoints, provenance), the machine, the batch plan,
    the run directory, the vocabulary, the objective (built once, for the trained window when
    sampling, and checked) and the evaluated checkpoint (None when training)."""

    settings: settings.RunSettings
    record: dict[str, Any]
    hw: settings.Hardware
    plan: settings.BatchPlan
    run_dir: str
    vocab: dataloader.Vocab
    objective: Any
    loaded: LoadedCheckpoint | None = None


def prepare(cfg: DictConfig, run_dir: str) -> Job:
    """Every check of `cfg` that does not need the mode's data or module: the settings, the
    objective's capabilities, the evaluated checkpoint (a pretrained backbone's: trained from
    the run's model.pretrained) and, for sample_eval, its trained window. Writes nothing but
    the data package's tokenizer cache; sets `block_size` in `cfg` to the K the objective
    uses."""
    command_line = command_line_keys()
    run, hw, plan = settings.check(cfg, command_line=command_line)
    settings.configure_float32_matmul(run.trainer)
    if run.mode == "sample_eval":
        builders.build_evaluator(run.eval, "cpu")  # a judge that cannot be loaded fails first
    vocab = dataloader.run_vocab(run.model, run.data)
    crop = settings.text8_crop(run, vocab.bos_id, vocab.eos_id) if run.mode == "train" else None
    # sample_eval: model.length is the generation length; the capabilities do not depend on
    # the context, checked now, before the checkpoint gives the trained window
    seq_len = run.block_size if run.mode == "sample_eval" else run.model.length
    objective = settings.build_objective(run, seq_len, vocab.mask_id, crop)
    settings.check_objective(run, objective, hw)
    loaded = None  # eval.checkpoint_path=null: a pretrained backbone evaluated as it is
    if run.mode in EVAL_MODES and run.eval.checkpoint_path is not None:
        spec, key = settings.objective_spec(run), "eval.checkpoint_path"
        heads = run.model.reference_heads()
        loaded = registry.read_for_eval(
            spec, run.eval.checkpoint_path, key, heads, run.model.backbone
        )
        settings.check_pretrained_source(run, loaded, command_line)
    if run.mode == "sample_eval":  # the objective of the checkpoint's trained window
        # without a checkpoint, the whole generation is the window
        window = run.model.length if loaded is None else trained_length(loaded, run.model.length)
        where = "the checkpoint's trained window" if loaded else "model.length"
        run = settings.settle_block_size(cfg, run, window, where, command_line)
        objective = settings.build_objective(run, window, vocab.mask_id)
        settings.check_sampler(run, objective, window)
    if settings.evaluates_released(run, loaded):  # float32 unless a precision is set
        hw = settings.resolve_hardware(run.trainer, released_checkpoint=True)
    if hw.precision_choice is not None:
        log.info("trainer.precision=auto -> %s (%s)", hw.precision, hw.precision_choice)
    record = OmegaConf.to_container(cfg, resolve=True)
    return Job(run, record, hw, plan, run_dir, vocab, objective, loaded)


def write_json(path: str, payload: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def write_resolved_config(cfg: DictConfig, job: Job) -> None:
    """RUN_DIR/config_resolved.yaml (and a sampling.logdir's, which scripts/paper_tables.py
    matches samples by), written by global rank 0; printed with verbose=true."""
    if global_rank() != 0:
        return
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    run = job.settings
    if run.verbose:
        log.info("resolved config:\n%s", resolved)
    logdir = run.sampling.logdir if run.mode == "sample_eval" else None
    for directory in dict.fromkeys(d for d in (job.run_dir, logdir) if d):
        os.makedirs(directory, exist_ok=True)
        with (
            atomic_path(os.path.join(directory, "config_resolved.yaml")) as tmp,
            open(tmp, "w") as f,
        ):
            f.write(resolved)


def run_provenance(job: Job, datasets: dict, checkpoint=None) -> dict:
    """provenance.record of this run (the token caches of `datasets`, {split: dataset}, and
    `checkpoint`), also written to RUN_DIR/provenance.json by global rank 0."""
    caches = {split: provenance.cache_name_of(ds) for split, ds in datasets.items()}
    prov = provenance.record(
        job.record, job.hw, run_dir=job.run_dir, data_cache=caches, checkpoint=checkpoint
    )
    if global_rank() == 0:
        provenance.write(job.run_dir, prov)
    return prov


def without_provenance(result: dict) -> dict:
    """What the console shows of an output JSON (the record is in the file)."""
    return {k: v for k, v in result.items() if k != "provenance"}


# ----------------------------------------------------------------------------------------------
# Modes. Each is a generator: up to its one `yield` it builds and checks everything that can
# fail on user input (UserError) and writes nothing; `run` then writes the resolved config and
# resumes it to do the work. A mode that finds nothing to do returns before its yield.
# ----------------------------------------------------------------------------------------------
def train(job: Job):
    """Train, resuming from checkpointing.resume_ckpt_path when resume_from_ckpt is on and the
    file exists (a local path or an fsspec URL: a remote one is read through a local copy in
    the run directory, removed after the fit)."""
    checkpointing = job.settings.checkpointing
    path = checkpointing.resume_ckpt_path if checkpointing.resume_from_ckpt else None
    key = "checkpointing.resume_ckpt_path"
    with (
        local_copy_if_exists(path, key, job.run_dir) if path else contextlib.nullcontext()
    ) as resume:
        yield from fit(job, resume, path)


def check_resume(record: dict, local: str, path: str) -> dict:
    """The resume checkpoint `path` (read from its local copy `local`), after checking that
    the run (`record`: its resolved config) changes no key of the config it was trained with
    that cannot change mid-run (settings.check_resume_config); UserError otherwise. Its names
    and shapes are checked against the module once that is built (check_state)."""
    key = "checkpointing.resume_ckpt_path"
    try:
        last = read_checkpoint(local, key)
    except UserError as err:  # the message names the local copy; the user gave `path`
        raise UserError(str(err).replace(local, path)) from None
    stored = last.get("config")
    if isinstance(stored, dict):
        settings.check_resume_config(stored, record, f"{key}={path}")
    return last


def fit(job: Job, resume: str | None, resume_path: str | None):
    """Build and fit; `resume`: the local copy of the checkpoint `resume_path` to resume from,
    None to start afresh (or from training.from_pretrained). A resume whose checkpoint has
    reached trainer.max_steps has nothing to do: one log line, nothing built or written."""
    run, hw, plan, vocab = job.settings, job.hw, job.plan, job.vocab
    last = None
    if resume is not None:
        last = check_resume(job.record, resume, resume_path)
        step, max_steps = last.get("global_step", 0), run.trainer.max_steps
        if step >= max_steps:
            log.info(
                "resumed at step %d from %s: trainer.max_steps=%d is reached, nothing left to "
                "do (raise trainer.max_steps to train on)",
                step, resume_path, max_steps,
            )  # fmt: skip
            return
    pretrained, source = None, run.training.from_pretrained
    key = "training.from_pretrained"
    if resume is None and source:
        pretrained = read_any_checkpoint(source, key, run.model.reference_heads())
        check_backbone(pretrained, run.model.backbone, key, "this run")
    module = builders.build_module(run, job.objective, vocab.size, job.record)
    length = run.model.length
    train_set = dataloader.get_dataset(run.data, vocab, "train", length)
    valid_set = dataloader.get_dataset(run.data, vocab, "valid", length)
    valid_loader = builders.build_loader(
        valid_set, plan.eval_batch_size, False, run, hw, evaluation=True
    )
    callbacks = []
    if pretrained is not None:
        size = builders.checkpoint_vocab_size(pretrained, run.model.backbone)
        if size is not None:
            dataloader.check_vocab_size(vocab, size, key)
        load_checkpoint_into(module, pretrained, key, for_training=True)
        log.info("fine-tuning from %s", source)
        threshold = ppl_threshold(source, run.eval.sanity_ppl_max)
        callbacks.append(LoadingSanityCheck(valid_loader, threshold, source))
    trainer = builders.build_trainer(
        run, hw, plan, job.run_dir, record=job.record, extra_callbacks=callbacks,
        backbone=module.backbone,
    )  # fmt: skip
    if last is not None:
        check_state(module, last, "checkpointing.resume_ckpt_path")  # same model shape?
        log.info("resumed at step %d from %s", last.get("global_step", 0), resume_path)
        del last  # Lightning reads the file again in fit; not held through training
    datasets = {"train": train_set, "valid": valid_set}
    yield
    origin = source if pretrained is not None else None
    module.provenance = run_provenance(job, datasets, origin)  # -> checkpoints
    builders.compile_for_training(module, run)
    with warnings.catch_warnings():
        if resume is not None:  # the directory holds the checkpoints resumed from
            warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
        try:
            trainer.fit(
                module,
                builders.build_loader(train_set, plan.batch_size, True, run, hw),
                valid_loader,
                ckpt_path=resume,
                weights_only=True,
            )
        finally:
            builders.finish_logger(trainer)
    stopper = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    if stopper is not None and stopper.exit_code is not None:
        raise SystemExit(stopper.exit_code)  # a signal stopped training: `train && eval` stops


def ppl_eval(job: Job):
    run, hw, plan = job.settings, job.hw, job.plan
    path = run.eval.checkpoint_path
    module = builders.build_eval_module(
        job.settings, job.objective, job.vocab, job.record, job.loaded
    )
    valid_set = dataloader.get_dataset(run.data, job.vocab, "valid", run.model.length)
    loader = builders.build_loader(valid_set, plan.eval_batch_size, True, run, hw, evaluation=True)
    trainer = builders.build_trainer(run, hw, plan, job.run_dir, backbone=module.backbone)
    module.mc_samples = run.eval.mc_samples
    yield
    trainer.validate(module, loader, verbose=False)
    if trainer.is_global_zero:
        result = {**module.eval_result, "checkpoint": path, "precision": hw.precision}
        result["provenance"] = run_provenance(job, {"valid": valid_set}, path)
        threshold = ppl_threshold(path, run.eval.sanity_ppl_max) if path else None
        if threshold is not None and result["ppl"] > threshold:
            log.warning(
                "perplexity %.2f exceeds %.2f for %s: check the checkpoint, tokenizer "
                "and data (a silent mis-load gives garbage)",
                result["ppl"],
                threshold,
                path,
            )
        write_json(os.path.join(job.run_dir, "ppl_eval.json"), result)
        print(json.dumps(without_provenance(result)))


def sample_eval(job: Job):
    run, hw, plan, vocab = job.settings, job.hw, job.plan, job.vocab
    fabric = L.Fabric(
        accelerator=hw.accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        strategy="ddp" if hw.world_size > 1 else "auto",
        precision=hw.precision,
    )
    fabric.launch()
    evaluator = builders.build_evaluator(run.eval, fabric.device)
    window = job.objective.seq_len  # the checkpoint's trained window
    module = builders.build_eval_module(run, job.objective, vocab, job.record, job.loaded)
    module.apply_ema()
    module.to(fabric.device).eval()
    ids = sampling.TokenIds(bos=vocab.bos_id, mask=vocab.mask_id, eos=vocab.eos_id)
    try:
        sampler_cfg, sample_fn = registry.build_sampler(
            settings.objective_spec(run), module.algorithm, module.backbone, window,
            run.model.length, ids, settings.sampling_options(run),
            reencode=run.sampling.reencode_context, network=module.network,
        )  # fmt: skip
    except ValueError as err:
        raise UserError(str(err)) from None
    prompts = builders.read_prompts(run, vocab, sampler_cfg.block_size, sampler_cfg.context)
    out_dir = run.sampling.logdir or job.run_dir
    generation = generate.GenerationJob(
        batch_size=plan.eval_batch_size,
        num_batches=run.sampling.num_sample_batches,
        seed=run.seed,
        out_dir=out_dir,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        prompts=prompts,
        append=run.sampling.logdir is not None,
        show_progress=sys.stderr.isatty(),  # no carriage-return bars in slurm logs
    )
    yield
    # the sampler runs in the run's precision; the judge scores in float32 outside it
    sampling_seconds: list[float] = []  # the sampler's own time, judging and writing left out
    records = generate.generate(
        sample_fn, sampler_cfg, generation, vocab, evaluator, fabric.device,
        autocast=fabric.autocast, sampling_seconds=sampling_seconds,
    )  # fmt: skip
    fabric.barrier()
    if fabric.global_rank == 0:
        prov = run_provenance(job, {}, run.eval.checkpoint_path)
        judge = run.eval.gen_ppl_eval_model_name_or_path
        summary = generate.write_summary(out_dir, judge, extra={"provenance": prov})
        seconds, tokens = sum(sampling_seconds), sum(r["length"] for r in records)
        log.info(
            "sampled %d sequences, %d tokens in %.1f s of sampling: %.0f tokens/s (rank 0)",
            len(records), tokens, seconds, tokens / max(seconds, 1e-9),
        )  # fmt: skip
        for record in records[:2]:  # without the BOS every sample starts with, one line each
            ids = record["token_ids"]
            text = dataloader.decode(vocab, ids[1:] if ids[:1] == [vocab.bos_id] else ids)
            text = text.strip().replace("\n", " ⏎ ")  # samples.jsonl keeps the text as is
            print(f"--- sample {record['index']} ({record['length']} tokens): {text}")
        print(json.dumps(without_provenance(summary)))


MODES = {"train": train, "ppl_eval": ppl_eval, "sample_eval": sample_eval}
NOTHING_TO_DO = object()  # what next() gives for a mode that returned before its yield


def run(cfg: DictConfig, run_dir: str | None = None) -> None:
    """One run of `cfg` in `run_dir` (default: the Hydra job's output directory). Every check
    that can fail on user input (UserError) runs before anything is written: the settings, the
    objective, the evaluated checkpoint (`prepare`), then the mode's own up to its yield (see
    Modes); then the resolved config is written and the mode does its work."""
    job = prepare(cfg, run_dir or HydraConfig.get().runtime.output_dir)
    L.seed_everything(job.settings.seed, verbose=False)
    steps = MODES[job.settings.mode](job)
    with contextlib.closing(steps):
        if next(steps, NOTHING_TO_DO) is NOTHING_TO_DO:
            return
        write_resolved_config(cfg, job)
        next(steps, None)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as err:
        fail(err)
    except SIGTERMException as stop:  # Lightning's own (SIGTERM before training) has no code
        sys.exit(stop.code or 128 + signal.SIGTERM)


if __name__ == "__main__":
    quiet_console()  # Lightning's tips and known deprecation warnings
    main()
