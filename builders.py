"""The `build_*` functions that turn checked config nodes (see settings/) into the module,
data loaders, logger, strategy, callbacks and trainer. Only main.py calls these.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from algorithms.base import DoubleLengthCrop
from algorithms.clip_search import interval_grid
from dataloader import make_loader
from diffusion import Diffusion, OptimSettings
from models.backbone import backbone_spec
from registry import settings_from
from sampling.context import check_prompt_length, prompt_ids
from settings import BatchPlan, Hardware, build_objective, objective_spec, plan_batches
from training_callbacks import AtomicCheckpointIO, Preemption, ProgressLog, Throughput
from utils import UserError, without_file_scheme


def read_prompts(cfg: DictConfig, vocab, block_size: int, window: int) -> list[str] | None:
    """sampling.prefix (one prompt for every sample) or sampling.prefix_file (one per line),
    each checked to leave room for one block of `block_size` tokens in the model's `window`
    (UserError naming the key, and the line of the file)."""
    if cfg.sampling.prefix is not None:
        prompt = str(cfg.sampling.prefix)
        check_prompts([(prompt, "sampling.prefix")], vocab, block_size, window)
        batch = plan_batches(cfg.loader, 1).eval_batch_size
        return [prompt] * (batch * int(cfg.sampling.num_sample_batches))
    if cfg.sampling.prefix_file is not None:
        path = cfg.sampling.prefix_file
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


def build_evaluator(cfg: DictConfig, device):
    """The generative-perplexity judge, or None when eval.gen_ppl_eval_model_name_or_path is
    null. Its config is probed now so that a bad name fails before any sampling."""
    from metrics import GenerativePerplexity

    name = cfg.eval.gen_ppl_eval_model_name_or_path
    if name is None:
        return None
    evaluator = GenerativePerplexity(str(name), device)
    try:
        evaluator.check()
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"eval.gen_ppl_eval_model_name_or_path={name} cannot be loaded ({reason[:160]}); "
            "give a local model directory, or null to skip generative perplexity"
        ) from None
    return evaluator


def build_module(
    cfg: DictConfig,
    vocab_size: int,
    mask_id: int,
    seq_len: int | None = None,
    bos_eos: tuple[int, int] | None = None,
    network=None,
) -> Diffusion:
    """The LightningModule for `cfg`, freshly initialised (seed before calling). seq_len: the
    training context L when `model.length` means something else (the generation length).
    bos_eos: the inserted BOS/EOS ids, needed by the text8-crop path (2L training rows).
    network: a network loaded from a released format (registry.ReleasedFormat) to use instead
    of a fresh `model.backbone` (models.backbone.BACKBONES) sized by the model keys for rows
    of seq_len."""
    seq_len = seq_len or int(cfg.model.length)
    crop = None
    if cfg.data.train == "text8-crop" and bos_eos is not None:
        insert = bool(cfg.data.get("insert_train_special", True))
        crop = DoubleLengthCrop(bos_eos[0], bos_eos[1], insert)
    spec = objective_spec(cfg)
    algorithm = build_objective(cfg, seq_len, mask_id, crop)
    backbone_entry = backbone_spec(str(cfg.model.backbone))
    if network is not None:  # a loaded network (a released format its objective read)
        backbone = network
    else:
        backbone = backbone_entry.build(cfg.model, vocab_size, seq_len, spec.causal)
    # a token backbone is called through models.network.BackboneNetwork; any other network
    # (SSD-LM's) is the callable its objective calls itself
    network = None if backbone_entry.token_network else backbone
    schedule = cfg.lr_scheduler
    optim = OptimSettings(
        lr=float(cfg.optim.lr),
        beta1=float(cfg.optim.beta1),
        beta2=float(cfg.optim.beta2),
        eps=float(cfg.optim.eps),
        weight_decay=float(cfg.optim.weight_decay),
        lr_schedule=schedule.name,
        warmup_steps=int(schedule.get("num_warmup_steps", 0) or 0),
        max_steps=int(cfg.trainer.max_steps),
        warmup_t=schedule.get("warmup_t"),
        warmup_lr_init=float(schedule.get("warmup_lr_init", 1e-6)),
        lr_min=float(schedule.get("lr_min", 1e-6)),
        ema=float(cfg.training.ema),
    )
    module = Diffusion(
        backbone,
        algorithm,
        optim,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        var_min=bool(cfg.algo.var_min),
        eps_min=float(cfg.training.sampling_eps_min),
        eps_max=float(cfg.training.sampling_eps_max),
        use_ema_for_eval=not cfg.eval.disable_ema,
        clip_grid=interval_grid(
            list(cfg.algo.clip_search_widths),
            float(cfg.algo.clip_search_delta),
            algorithm.block_size,
        ),
        clip_search_batches=int(cfg.algo.clip_search_batches),
        fix_clipping=bool(cfg.algo.fix_clipping),
        seed=int(cfg.seed),
        network=network,
    )
    module.family = spec.family(settings_from(spec.settings, cfg.algo))
    return module


def compile_for_training(module: Diffusion, cfg: DictConfig) -> None:
    """`training.compile=true`: torch.compile each DiT block for the training steps (see
    DiT.compile_blocks; validation and sampling stay eager)."""
    if cfg.training.get("compile", False):
        module.backbone.compile_blocks(dynamic=False)


def build_loader(
    dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    cfg: DictConfig,
    hw: Hardware,
    evaluation: bool = False,
):
    """evaluation: items carry their global-batch rows and padding flags (data EvalRows), so that
    evaluation numbers do not depend on the number of processes."""
    workers = cfg.loader.num_workers
    if workers is None:
        workers = 0 if hw.accelerator == "cpu" else min(8, len(os.sched_getaffinity(0)))
    pin = bool(cfg.loader.pin_memory) and hw.accelerator == "gpu"
    return make_loader(
        dataset,
        batch_size,
        shuffle,
        seed,
        num_workers=workers,
        pin_memory=pin,
        eval_rows=evaluation,
    )


def build_logger(cfg: DictConfig, run_dir: str):
    """CSV logs under run_dir/logs with `wandb=null`, else a wandb run in run_dir. Each point
    of a `-m` sweep is its own wandb run, named after its overrides (finish_logger ends it)."""
    if cfg.wandb is None:
        return L.pytorch.loggers.CSVLogger(run_dir, name="logs")
    wandb_cfg = OmegaConf.to_container(cfg.wandb, resolve=True)
    point = sweep_point()
    if point is not None:
        wandb_cfg["name"] = f"{wandb_cfg['name']}-{point}" if wandb_cfg.get("name") else point
    return L.pytorch.loggers.WandbLogger(
        save_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True), **wandb_cfg
    )


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


def build_strategy(cfg: DictConfig, hw: Hardware):
    """`strategy=ddp` (the default; plain single-process when there is one device) or
    `strategy=fsdp` (CUDA only, checked by validate_strategy): each DiT block is its own FSDP
    unit (`fsdp_wrap_policy`). `strategy.force=true` builds the DDP strategy on one device too
    (the GPU acceptance check)."""
    if cfg.strategy.name == "fsdp":
        return L.pytorch.strategies.FSDPStrategy(
            sharding_strategy=cfg.strategy.get("sharding_strategy", "SHARD_GRAD_OP"),
            auto_wrap_policy=fsdp_wrap_policy(str(cfg.model.backbone)),
            mixed_precision=fsdp_mixed_precision(hw.precision),
        )
    if hw.world_size == 1 and not cfg.strategy.force:
        return "auto"
    return L.pytorch.strategies.DDPStrategy(
        find_unused_parameters=bool(cfg.strategy.find_unused_parameters)
    )


def fsdp_mixed_precision(precision: str):
    """FSDP's mixed precision for `precision`: parameters in bf16/fp16, but gradients reduced
    and buffers (the rotary frequencies) kept in float32; None for full precision."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def fsdp_wrap_policy(backbone: str = "dit"):
    """FSDP auto-wrap policy of `model.backbone` `backbone`: every transformer block is a unit
    of its own (parameters gathered one block at a time), as the backbone's registry entry
    declares them (models.backbone.BackboneSpec.fsdp_units); embeddings, timestep layers and
    output layers stay with the root."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(backbone_spec(backbone).fsdp_units())


def build_callbacks(cfg: DictConfig) -> list:
    """The configured callbacks; `checkpointing.keep_last_k` turns the every-N-steps
    checkpoints into a rolling window of the k newest (null keeps all, as the reference).
    Checkpoint directories may be fsspec URLs; a file:// one is passed as its local path."""
    callbacks = []
    for name, node in cfg.callbacks.items():
        options = {}
        if node.get("dirpath") is not None:
            options["dirpath"] = without_file_scheme(str(node.dirpath))
        keep = cfg.checkpointing.get("keep_last_k")
        if name == "checkpoint_every_n_steps" and keep is not None:
            options.update(save_top_k=int(keep), monitor="step", mode="max", verbose=False)
        callbacks.append(hydra.utils.instantiate(node, **options))
    callbacks.append(Preemption(cfg.checkpointing.resume_ckpt_path))
    callbacks.append(Throughput(int(cfg.trainer.log_every_n_steps)))
    return callbacks


def build_trainer(
    cfg: DictConfig,
    hw: Hardware,
    plan: BatchPlan,
    run_dir: str,
    fit: bool,
    extra_callbacks: Sequence[L.Callback] = (),
):
    """fit=True adds the checkpoint and run callbacks and the logger; evaluation runs get
    neither; `extra_callbacks` come after them (main.train's loading sanity check). Checkpoint
    files are written atomically. Progress: Lightning's bar when stdout is a terminal, else
    training_callbacks.ProgressLog lines every trainer.log_every_n_steps."""
    strategy = build_strategy(cfg, hw)
    callbacks = [*(build_callbacks(cfg) if fit else []), *extra_callbacks]
    plugins = [AtomicCheckpointIO()]
    if "SLURM_JOB_ID" in os.environ:  # our Preemption callback requeues, not Lightning's
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
    derived = ("accelerator", "devices", "num_nodes", "precision", "accumulate_grad_batches")
    ours = ("deterministic", "float32_matmul_precision")
    passthrough = {k: v for k, v in cfg.trainer.items() if k not in (*derived, *ours)}
    # Lightning's progress bar on a terminal, else log lines (slurm logs); the model summary
    # table with verbose=true. trainer.enable_progress_bar / enable_model_summary still win.
    passthrough.setdefault("enable_progress_bar", sys.stdout.isatty())
    passthrough.setdefault("enable_model_summary", bool(cfg.get("verbose", False)))
    if fit and not passthrough["enable_progress_bar"]:
        callbacks.append(ProgressLog(int(cfg.trainer.log_every_n_steps)))
    deterministic = cfg.trainer.get("deterministic")
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
        logger=build_logger(cfg, run_dir) if fit else False,
        enable_checkpointing=fit,
        default_root_dir=run_dir,
        plugins=plugins,
        deterministic=deterministic,
        **passthrough,
    )
