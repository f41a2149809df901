"""The `build_*` functions that turn the typed, checked settings (settings.RunSettings) into
the module, data loaders, logger, strategy, callbacks and trainer. Only main.py calls these.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

import hydra
import lightning as L
import torch

from algorithms.base import Objective
from algorithms.clip_search import interval_grid
from checkpoints import LoadedCheckpoint, load_checkpoint_into
from dataloader import check_vocab_size, make_loader
from diffusion import Diffusion, OptimSettings
from models.backbone import backbone_spec
from sampling.context import check_prompt_length, prompt_ids
from settings import BatchPlan, Hardware, RunSettings, objective_spec, plan_batches
from settings.groups import EvalSettings
from training_callbacks import AtomicCheckpointIO, Preemption, ProgressLog, Throughput
from utils import UserError, without_file_scheme


def read_prompts(run: RunSettings, vocab, block_size: int, window: int) -> list[str] | None:
    """sampling.prefix (one prompt for every sample) or sampling.prefix_file (one per line),
    each checked to leave room for one block of `block_size` tokens in the model's `window`
    (UserError naming the key, and the line of the file)."""
    sampling = run.sampling
    if sampling.prefix is not None:
        prompt = str(sampling.prefix)  # any value: its text is the prompt
        check_prompts([(prompt, "sampling.prefix")], vocab, block_size, window)
        batch = plan_batches(run.loader, 1).eval_batch_size
        return [prompt] * (batch * sampling.num_sample_batches)
    if sampling.prefix_file is not None:
        path = sampling.prefix_file
        with open(path) as f:
            lines = [(line.rstrip("\n"), n) for n, line in enumerate(f, 1) if line.strip()]
        if not lines:
            raise UserError(f"sampling.prefix_file={path} has no prompts")
        check_prompts(
            [(prompt, f"sampling.prefix_file={path}: line {n}") for prompt, n in lines],
            vocab,
            block_size,
            window,
        )
        return [prompt for prompt, _ in lines]
    return None


def check_prompts(prompts: list[tuple[str, str]], vocab, block_size: int, window: int) -> None:
    """(prompt, where it comes from) pairs: UserError naming the first too long for the window
    (sampling.context.check_prompt_length)."""
    ids = prompt_ids([prompt for prompt, _ in prompts], vocab)
    for (_, where), row in zip(prompts, ids, strict=True):
        try:
            check_prompt_length(len(row), block_size, window)
        except ValueError as err:
            raise UserError(f"{where}: {err}; shorten it") from None


def build_evaluator(settings: EvalSettings, device):
    """The generative-perplexity judge, or None when eval.gen_ppl_eval_model_name_or_path is
    null. Its config is probed now so that a bad name fails before any sampling."""
    from metrics import GenerativePerplexity

    name = settings.gen_ppl_eval_model_name_or_path
    if name is None:
        return None
    evaluator = GenerativePerplexity(name, device)
    try:
        evaluator.check()
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"eval.gen_ppl_eval_model_name_or_path={name} cannot be loaded ({reason[:160]}); "
            "give a local model directory, a .gguf file, smollm2-135m (packaged), or null to "
            "skip generative perplexity"
        ) from None
    return evaluator


def build_module(
    run: RunSettings, objective: Objective, vocab_size: int, record: dict, network=None
) -> Diffusion:
    """The LightningModule of `run` around `objective` (settings.build_objective, checked),
    freshly initialised (seed before calling): a new `model.backbone`
    (models.backbone.BACKBONES) sized by the model keys for rows of the objective's seq_len
    over `vocab_size` ids, or `network`, one loaded from a released format
    (registry.ReleasedFormat). record: the resolved config, stored in every checkpoint."""
    spec = objective_spec(run)
    backbone_entry = backbone_spec(run.model.backbone)
    if network is not None:  # a loaded network (a released format its objective read)
        backbone = network
    else:  # the backbone registry reads the model group as a mapping of its keys
        model = dataclasses.asdict(run.model)
        try:
            backbone = backbone_entry.build(model, vocab_size, objective.seq_len, spec.causal)
        except ValueError as err:  # shapes or a model the backbone cannot take
            raise UserError(str(err).splitlines()[0]) from None
        backbone.train()  # as a new nn.Module is (a pretrained model loads in eval mode)
    # a token backbone is called through models.network.BackboneNetwork; any other network
    # (SSD-LM's) is the callable its objective calls itself
    network = None if backbone_entry.token_network else backbone
    optim = OptimSettings(
        lr=run.optim.lr,
        beta1=run.optim.beta1,
        beta2=run.optim.beta2,
        eps=run.optim.eps,
        weight_decay=run.optim.weight_decay,
        lr_schedule=run.lr_scheduler.name,
        max_steps=run.trainer.max_steps,
        ema=run.training.ema,
        **run.lr_scheduler.schedule(),
    )
    search, clip = run.algo.clip_search(), {}  # no search: every objective but BD3-LM
    if search is not None:
        grid = interval_grid(list(search.widths), search.delta, objective.block_size)
        clip = dict(
            clip_grid=grid, clip_search_batches=search.batches, fix_clipping=search.fix_clipping
        )
    module = Diffusion(
        backbone,
        objective,
        optim,
        run_config=record,
        var_min=run.algo.var_min,
        eps_min=run.training.sampling_eps_min,
        eps_max=run.training.sampling_eps_max,
        use_ema_for_eval=not run.eval.disable_ema,
        seed=run.seed,
        network=network,
        **clip,
    )
    module.family = spec.family(run.algo)
    return module


def checkpoint_vocab_size(loaded: LoadedCheckpoint, backbone: str) -> int | None:
    """Embedding rows of a checkpoint of `model.backbone` `backbone` (its V: the DiT's config,
    else the backbone's registry entry reads its state dict, vocab_rows), or None when it
    cannot be read."""
    if loaded.dit is not None:
        return loaded.dit.vocab_size
    state = (loaded.raw or {}).get("state_dict", {})
    return backbone_spec(backbone).vocab_rows(state)


def build_eval_module(
    run: RunSettings, objective: Objective, vocab, record: dict, loaded: LoadedCheckpoint | None
) -> Diffusion:
    """The module for `eval.checkpoint_path` (`loaded`, any supported format) around
    `objective`, weights loaded strictly by name; EMA weights are swapped in by the caller's
    mode. loaded=None (eval.checkpoint_path=null): the backbone as its build makes it, a
    pretrained model's own weights (settings refuse it for a randomly initialised one)."""
    key = "eval.checkpoint_path"
    if loaded is None:
        return build_module(run, objective, vocab.size, record)
    if loaded.format == "network":  # a released format its objective read: the network is built
        check_vocab_size(vocab, loaded.meta["vocab_size"], key)
        network = loaded.raw["network"]
        return build_module(run, objective, vocab.size, record, network=network)
    size = checkpoint_vocab_size(loaded, run.model.backbone)
    if size is not None:
        check_vocab_size(vocab, size, key)
    module = build_module(run, objective, vocab.size, record)
    load_checkpoint_into(module, loaded, key, for_training=False)
    return module


def compile_for_training(module: Diffusion, run: RunSettings) -> None:
    """`training.compile=true`: torch.compile each DiT block for the training steps (see
    DiT.compile_blocks; validation and sampling stay eager)."""
    if run.training.compile:
        module.backbone.compile_blocks(dynamic=False)


def build_loader(
    dataset,
    batch_size: int,
    shuffle: bool,
    run: RunSettings,
    hw: Hardware,
    evaluation: bool = False,
):
    """A loader of `dataset`, its order seeded by the run's `seed`. evaluation: items carry
    their global-batch rows and padding flags (data EvalRows), so that evaluation numbers do
    not depend on the number of processes."""
    workers = run.loader.num_workers
    if workers is None:
        workers = 0 if hw.accelerator == "cpu" else min(8, len(os.sched_getaffinity(0)))
    pin = run.loader.pin_memory and hw.accelerator == "gpu"
    return make_loader(
        dataset,
        batch_size,
        shuffle,
        run.seed,
        num_workers=workers,
        pin_memory=pin,
        eval_rows=evaluation,
    )


def build_logger(run: RunSettings, record: dict, run_dir: str):
    """CSV logs under run_dir/logs with `wandb=null`, else a wandb run in run_dir (its config:
    `record`, the resolved config). Each point of a `-m` sweep is its own wandb run, named
    after its overrides (finish_logger ends it)."""
    if run.wandb is None:
        return L.pytorch.loggers.CSVLogger(run_dir, name="logs")
    options = dict(run.wandb)  # WandbLogger's keywords (the schema checked their names)
    point = sweep_point()
    if point is not None:
        options["name"] = f"{options['name']}-{point}" if options.get("name") else point
    return L.pytorch.loggers.WandbLogger(save_dir=run_dir, config=record, **options)


def sweep_point() -> str | None:
    """The overrides that name this point of a `-m` sweep (its job number when it has none);
    None outside sweeps."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    job = HydraConfig.get().job
    return str(job.override_dirname or job.num)


def finish_logger(trainer) -> None:
    """End this run's wandb run (if one started), so that the next point of a sweep in the same
    process starts its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if trainer.is_global_zero and wandb is not None and wandb.run is not None:
        wandb.finish()


def build_strategy(run: RunSettings, hw: Hardware, backbone=None):
    """`strategy=ddp` (the default; plain single-process when there is one device) or
    `strategy=fsdp` (CUDA only, checked by validate_strategy): each transformer layer of the
    built `backbone` is its own FSDP unit (`fsdp_wrap_policy`). `strategy.force=true` builds
    the DDP strategy on one device too (the GPU acceptance check)."""
    strategy = run.strategy
    if strategy.name == "fsdp":
        return L.pytorch.strategies.FSDPStrategy(
            sharding_strategy=strategy.sharding_strategy,
            auto_wrap_policy=fsdp_wrap_policy(run.model.backbone, backbone),
            mixed_precision=fsdp_mixed_precision(hw.precision),
        )
    if hw.world_size == 1 and not strategy.force:
        return "auto"
    return L.pytorch.strategies.DDPStrategy(find_unused_parameters=strategy.find_unused_parameters)


def fsdp_mixed_precision(precision: str):
    """FSDP's mixed precision for `precision`: parameters in bf16/fp16, but gradients reduced
    and buffers (the rotary frequencies) kept in float32; None for full precision."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def fsdp_wrap_policy(name: str = "dit", backbone=None):
    """FSDP auto-wrap policy of `model.backbone` `name`: every transformer block is a unit of
    its own (parameters gathered one block at a time), as the backbone's registry entry
    declares them for the built `backbone` (models.backbone.BackboneSpec.fsdp_units: a
    pretrained model's depend on it); embeddings, timestep layers and output layers stay with
    the root."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(backbone_spec(name).fsdp_units(backbone))


def build_callbacks(run: RunSettings) -> list:
    """The configured callbacks; `checkpointing.keep_last_k` turns the every-N-steps
    checkpoints into a rolling window of the k newest (null keeps all, as the reference).
    Checkpoint directories may be fsspec URLs; a file:// one is passed as its local path."""
    callbacks = []
    keep = run.checkpointing.keep_last_k
    for name, node in run.callbacks.items():
        options = {}
        if node.get("dirpath") is not None:  # a Hydra node's own keyword
            options["dirpath"] = without_file_scheme(node["dirpath"])
        if name == "checkpoint_every_n_steps" and keep is not None:
            options.update(save_top_k=keep, monitor="step", mode="max", verbose=False)
        callbacks.append(hydra.utils.instantiate(node, **options))
    callbacks.append(Preemption(run.checkpointing.resume_ckpt_path))
    callbacks.append(Throughput(run.trainer.log_every_n_steps))
    return callbacks


def build_trainer(
    run: RunSettings,
    hw: Hardware,
    plan: BatchPlan,
    run_dir: str,
    record: dict | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
    backbone=None,
):
    """The trainer of a fit when `record` (the resolved config, which the logger records) is
    given: the checkpoint and run callbacks and the logger; evaluation runs (record=None) get
    neither; `extra_callbacks` come after them (main.train's loading sanity check); `backbone`:
    the module's network (its FSDP units, strategy=fsdp). Checkpoint
    files are written atomically. Progress: Lightning's bar when stdout is a terminal, else
    training_callbacks.ProgressLog lines every trainer.log_every_n_steps."""
    fit = record is not None
    strategy = build_strategy(run, hw, backbone)
    callbacks = [*(build_callbacks(run) if fit else []), *extra_callbacks]
    plugins = [AtomicCheckpointIO()]
    if "SLURM_JOB_ID" in os.environ:  # our Preemption callback requeues, not Lightning's
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = run.trainer
    # Lightning's progress bar on a terminal, else log lines (slurm logs); the model summary
    # table with verbose=true. trainer.enable_progress_bar / enable_model_summary still win.
    progress_bar = trainer.enable_progress_bar
    if progress_bar is None:
        progress_bar = sys.stdout.isatty()
    model_summary = trainer.enable_model_summary
    if model_summary is None:
        model_summary = run.verbose
    if fit and not progress_bar:
        callbacks.append(ProgressLog(trainer.log_every_n_steps))
    deterministic = trainer.deterministic
    if deterministic is None:  # multi-threaded CPU kernels are otherwise not bit-reproducible
        deterministic = hw.accelerator == "cpu"
    return L.Trainer(
        accelerator=hw.accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        precision=hw.precision,
        accumulate_grad_batches=plan.accumulate,
        strategy=strategy,
        callbacks=callbacks,
        logger=build_logger(run, record, run_dir) if fit else False,
        enable_checkpointing=fit,
        default_root_dir=run_dir,
        plugins=plugins,
        deterministic=deterministic,
        enable_progress_bar=progress_bar,
        enable_model_summary=model_summary,
        **trainer.keywords(),
    )
