"""Hydra entry point: compose and validate the config, build tokenizer, data, module and
trainer, and dispatch on `mode` (train | ppl_eval | sample_eval). No maths here.

Every output goes under the run directory (`hydra.run.dir=DIR`; under `-m`, one directory per
sweep point). Bad input exits with code 2 and one `error:` line on stderr (also in the run's
main.log), before anything is written: the command line's group options and keys are checked
before torch and Lightning are imported (`check_command_line`), every other check before the
run writes its first file (`run`). `compose(overrides, run_dir)` + `run(cfg, run_dir)` is the
same run in process (tests, scripts).
"""

# ruff: noqa: E402 (the heavy imports come after the command-line check, see __main__ below)
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

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
OTHER_PRIMARY_CONFIG = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")
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


def check_override_keys(overrides: Sequence[str]) -> None:
    """Fail in one line on a `key=value` override of a key that the composed config does not
    have, with the schema's "did you mean" hint (Hydra's own message advises `+key=`, which the
    schema then refuses). The config is composed from the overrides that shape it (groups,
    `+key=` additions, `~key` deletions), once per option of a swept group (`-m
    lr_scheduler=constant,cosine_decay_warmup`). Additions, deletions and Hydra's own keys are
    left to Hydra and the schema, and so is a command line Hydra cannot parse or compose."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return
    changes, shaping = [], []
    for override in parsed:
        if override.is_hydra_override():
            continue
        key = override.key_or_group
        plain = override.type == OverrideType.CHANGE and override.package is None
        is_group = os.path.isdir(os.path.join(CONFIG_DIR, key))
        (changes if plain and not is_group else shaping).append(override)
    if not changes:
        return
    for variant, note in _shaping_variants(shaping):
        try:
            with initialize_config_dir(CONFIG_DIR, version_base=None):
                cfg = hydra_compose("config", overrides=variant)
        except (HydraException, OmegaConfBaseException):
            return
        config = OmegaConf.to_container(cfg, resolve=False)
        for override in changes:
            problem = unknown_key(config, override.key_or_group, note)
            if problem is not None:
                raise UserError(problem)


def _shaping_variants(shaping: list) -> list[tuple[list[str], str]]:
    """(overrides, note) to compose, from Hydra's parsed overrides: each swept override at its
    first option, then each of its other options in turn (note: " with KEY=OPTION"); [] when a
    sweep is not a list of options (glob, range), which Hydra expands itself."""
    from hydra.core.override_parser.types import OverrideType

    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}
    options = []
    for override in shaping:
        if not override.is_sweep_override():
            options.append([override.input_line])
            continue
        if not override.is_discrete_sweep():
            return []
        head = prefix.get(override.type, "") + override.get_key_element()
        options.append([f"{head}={value}" for value in override.sweep_string_iterator()])
    base = [choices[0] for choices in options]
    variants = [(base, "")]
    for index, choices in enumerate(options):
        for choice in choices[1:]:
            variants.append(([*base[:index], choice, *base[index + 1 :]], f" with {choice}"))
    return variants


def unknown_key(config: dict, key: str, note: str = "") -> str | None:
    """Why the dotted `key` is not a key of the composed `config` (a plain dict; `note` says
    which composition), naming the closest key and the keys beside it; None when it is one, or
    when a list lies on its path (Hydra's to judge)."""
    parts, node = key.split("."), config
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth])
        if node is None:
            return f"{key}: {parent} is null here{note}; add the key with +{key}=VALUE"
        if not isinstance(node, dict):
            return None
        if part not in node:
            hint = _closest(config, node, parent, part)
            listing = ", ".join(map(str, node))
            if parent == "trainer":  # the schema also takes Lightning's other Trainer keywords
                listing += ", or another keyword of lightning.Trainer as +trainer.KEYWORD=VALUE"
            where = f" in {parent}" if parent else ""
            return f"{key} is not a known key{note} ({hint}valid{where}: {listing})"
        node = node[part]
    return None


def _closest(config: dict, node: dict, parent: str, name: str) -> str:
    """ "did you mean KEY? " for the key of `node` (at `parent`) closest to `name`, else for the
    closest key of that name anywhere in `config` (a key given in the wrong group), else ""."""
    close = difflib.get_close_matches(name, [str(k) for k in node], n=1)
    if close:
        return f"did you mean {parent + '.' if parent else ''}{close[0]}? "
    paths = _key_paths(config)
    close = difflib.get_close_matches(name, [p.rsplit(".", 1)[-1] for p in paths], n=1)
    if close:
        return f"did you mean {next(p for p in paths if p.rsplit('.', 1)[-1] == close[0])}? "
    return ""


def _key_paths(node: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict, inner nodes included."""
    paths = []
    for name, value in node.items():
        path = f"{prefix}{name}"
        paths.append(path)
        if isinstance(value, dict):
            paths += _key_paths(value, path + ".")
    return paths


def check_command_line(argv: Sequence[str]) -> None:
    """The overrides of `python main.py ARGV` (its arguments with `=`, and `~key` deletions):
    group options (check_group_choices), then keys (check_override_keys), unless a flag names
    another primary config."""
    if any(arg.split("=")[0] in OTHER_PRIMARY_CONFIG for arg in argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    check_group_choices(overrides)
    check_override_keys(overrides)


def fail(err: UserError) -> NoReturn:
    """The one line of bad input: `error: ...` on stderr and in the run's log files (Hydra's
    main.log, once it exists); exit code 2."""
    line = f"error: {err}"
    if global_rank() == 0:
        record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    print(line, file=sys.stderr)
    sys.exit(2)


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
    check_state,
    load_checkpoint_into,
    ppl_threshold,
    read_any_checkpoint,
    read_checkpoint,
    trained_length,
)
from sampling import generate
from training_callbacks import LoadingSanityCheck, Preemption


def compose(overrides: Sequence[str], run_dir: str) -> DictConfig:
    """The config that `python main.py OVERRIDES hydra.run.dir=RUN_DIR` runs, for in-process
    runs (tests, scripts): Hydra's compose API, with `${hydra:runtime.output_dir}` = run_dir.
    Bad group options and unknown keys are one UserError line, as on the command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    check_group_choices(overrides)
    try:
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    except ConfigCompositionException:
        check_override_keys(overrides)  # an unknown key: our line; else Hydra's error
        raise
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = os.path.abspath(run_dir)
        cfg.hydra.job.name = "main"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def command_line_keys() -> frozenset[str]:
    """The config keys this run's command line (or compose's overrides) sets, additions
    included; none outside Hydra."""
    if not HydraConfig.initialized():
        return frozenset()
    task = HydraConfig.get().overrides.task
    return frozenset(o.split("=", 1)[0].lstrip("+") for o in task if "=" in o and o[0] != "~")


def write_json(path: str, payload: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def write_resolved_config(cfg: DictConfig, run_dir: str) -> None:
    """RUN_DIR/config_resolved.yaml (and a sampling.logdir's, which scripts/paper_tables.py
    matches samples by), written by global rank 0; printed with verbose=true."""
    if global_rank() != 0:
        return
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    if cfg.verbose:
        log.info("resolved config:\n%s", resolved)
    logdir = cfg.sampling.logdir if cfg.mode == "sample_eval" else None
    for directory in dict.fromkeys(d for d in (run_dir, logdir) if d):
        os.makedirs(directory, exist_ok=True)
        with (
            atomic_path(os.path.join(directory, "config_resolved.yaml")) as tmp,
            open(tmp, "w") as f,
        ):
            f.write(resolved)


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
# Modes. Each is a generator: up to its one `yield` it builds and checks everything that can
# fail on user input (UserError) and writes nothing; `run` then writes the resolved config and
# resumes it to do the work. A mode that finds nothing to do returns before its yield.
# ----------------------------------------------------------------------------------------------
def train(cfg: DictConfig, hw: settings.Hardware, plan: settings.BatchPlan, run_dir: str, _):
    """Train, resuming from checkpointing.resume_ckpt_path when resume_from_ckpt is on and the
    file exists (a local path or an fsspec URL: a remote one is read through a local copy in
    the run directory, removed after the fit)."""
    path = cfg.checkpointing.resume_ckpt_path if cfg.checkpointing.resume_from_ckpt else None
    key = "checkpointing.resume_ckpt_path"
    with local_copy_if_exists(path, key, run_dir) if path else contextlib.nullcontext() as resume:
        yield from fit(cfg, hw, plan, run_dir, resume, path)


def check_resume(cfg: DictConfig, local: str, path: str) -> dict:
    """The resume checkpoint `path` (read from its local copy `local`), after checking that
    the run changes no key of the config it was trained with that cannot change mid-run
    (settings.check_resume_config); UserError otherwise. Its names and shapes are checked
    against the module once that is built (check_state)."""
    key = "checkpointing.resume_ckpt_path"
    try:
        last = read_checkpoint(local, key)
    except UserError as err:  # the message names the local copy; the user gave `path`
        raise UserError(str(err).replace(local, path)) from None
    stored = last.get("config")
    if isinstance(stored, dict):
        run_config = OmegaConf.to_container(cfg, resolve=True)
        settings.check_resume_config(stored, run_config, f"{key}={path}")
    return last


def fit(cfg, hw, plan, run_dir: str, resume: str | None, resume_path: str | None):
    """Build and fit; `resume`: the local copy of the checkpoint `resume_path` to resume from,
    None to start afresh (or from training.from_pretrained). A resume whose checkpoint has
    reached trainer.max_steps has nothing to do: one log line, nothing built or written."""
    last = None
    if resume is not None:
        last = check_resume(cfg, resume, resume_path)
        step, max_steps = int(last.get("global_step", 0)), int(cfg.trainer.max_steps)
        if step >= max_steps:
            log.info(
                "resumed at step %d from %s: trainer.max_steps=%d is reached, nothing left to "
                "do (raise trainer.max_steps to train on)",
                step, resume_path, max_steps,
            )  # fmt: skip
            return
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
    if last is not None:
        check_state(module, last, "checkpointing.resume_ckpt_path")  # same model shape?
        log.info("resumed at step %d from %s", last.get("global_step", 0), resume_path)
        del last  # Lightning reads the file again in fit; not held through training
    source = cfg.training.from_pretrained if pretrained is not None else None
    datasets = {"train": train_set, "valid": valid_set}
    yield
    module.provenance = run_provenance(cfg, hw, run_dir, datasets, source)  # -> checkpoints
    builders.compile_for_training(module, cfg)
    with warnings.catch_warnings():
        if resume is not None:  # the directory holds the checkpoints resumed from
            warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
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
    stopper = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    if stopper is not None and stopper.exit_code is not None:
        raise SystemExit(stopper.exit_code)  # a signal stopped training: `train && eval` stops


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
    if loaded.format == "network":  # a released format its objective read: the network is built
        dataloader.check_vocab_size(vocab, loaded.meta["vocab_size"], key)
        network = loaded.raw["network"]
        return vocab, builders.build_module(
            cfg, vocab.size, vocab.mask_id, seq_len, network=network
        )
    size = checkpoint_vocab_size(loaded)
    if size is not None:
        dataloader.check_vocab_size(vocab, size, key)
    module = builders.build_module(cfg, vocab.size, vocab.mask_id, seq_len)
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
    yield
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
    module.apply_ema()
    module.to(fabric.device).eval()
    ids = sampling.TokenIds(bos=vocab.bos_id, mask=vocab.mask_id, eos=vocab.eos_id)
    try:
        sampler_cfg, sample_fn = registry.build_sampler(
            settings.objective_spec(cfg), module.algorithm, module.backbone, window,
            int(cfg.model.length), ids, settings.sampling_options(cfg),
            reencode=bool(cfg.sampling.reencode_context), network=module.network,
        )  # fmt: skip
    except ValueError as err:
        raise UserError(str(err)) from None
    prompts = builders.read_prompts(cfg, vocab, sampler_cfg.block_size, sampler_cfg.context)
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
    yield
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
NOTHING_TO_DO = object()  # what next() gives for a mode that returned before its yield


def run(cfg: DictConfig, run_dir: str | None = None) -> None:
    """One run of `cfg` in `run_dir` (default: the Hydra job's output directory). Every check
    that can fail on user input (UserError) runs before anything is written: the settings, the
    evaluated checkpoint, then the mode's own up to its yield (see Modes); then the resolved
    config is written and the mode does its work."""
    run_dir = run_dir or HydraConfig.get().runtime.output_dir
    command_line = command_line_keys()
    hw, plan = settings.validate(cfg, command_line=command_line)
    settings.configure_float32_matmul(cfg.trainer)
    if cfg.mode == "sample_eval":
        builders.build_evaluator(cfg, "cpu")  # a judge that cannot be loaded fails first
    loaded = None
    if cfg.mode in EVAL_MODES:
        spec, key = settings.objective_spec(cfg), "eval.checkpoint_path"
        path = cfg.eval.checkpoint_path
        loaded = registry.read_for_eval(spec, path, key, n_heads(cfg), cfg.model.backbone)
    if cfg.mode == "sample_eval":
        settings.check_sampling(cfg, trained_length(loaded, cfg.model.length), command_line)
    if settings.evaluates_released(cfg, loaded):  # float32 unless a precision is set
        hw = settings.resolve_hardware(cfg.trainer, released_checkpoint=True)
    if hw.precision_choice is not None:
        log.info("trainer.precision=auto -> %s (%s)", hw.precision, hw.precision_choice)
    L.seed_everything(int(cfg.seed), verbose=False)
    steps = MODES[cfg.mode](cfg, hw, plan, run_dir, loaded)
    with contextlib.closing(steps):
        if next(steps, NOTHING_TO_DO) is NOTHING_TO_DO:
            return
        write_resolved_config(cfg, run_dir)
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
