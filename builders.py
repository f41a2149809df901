"""The boundary between the Hydra config and typed objects: hardware detection, batch
arithmetic, validation of every key before anything is written, and the `build_*` functions
that turn config nodes into the module, data loaders and trainer. Only main.py calls these.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from algorithms import build_algorithm
from algorithms.base import DoubleLengthCrop
from algorithms.clip_search import interval_grid
from dataloader import make_loader
from diffusion import Diffusion, OptimSettings
from models import build_backbone
from models.attention import BACKENDS, flash_available, flex_available
from noise_schedule import build_noise
from training_callbacks import AtomicCheckpointIO, Preemption, Throughput
from utils import UserError

MODES = ("train", "ppl_eval", "sample_eval")


@dataclasses.dataclass(frozen=True)
class Hardware:
    accelerator: str  # "cpu" | "gpu"
    devices: int  # per node
    num_nodes: int
    precision: str

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def resolve_hardware(trainer: DictConfig) -> Hardware:
    """`auto` values: CUDA when available (all visible GPUs, bf16-mixed), else 1 CPU, 32-true."""
    cuda = torch.cuda.is_available()
    accelerator = trainer.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if cuda else "cpu"
    elif accelerator == "cuda":
        accelerator = "gpu"
    if accelerator not in ("cpu", "gpu"):
        raise UserError(f"trainer.accelerator={accelerator!r}: valid are auto, cpu, gpu, cuda")
    if accelerator == "gpu" and not cuda:
        raise UserError("trainer.accelerator=gpu but no CUDA device is visible; use auto or cpu")
    devices = trainer.devices
    if devices == "auto":
        devices = torch.cuda.device_count() if accelerator == "gpu" else 1
    if not isinstance(devices, int) or devices < 1:
        raise UserError(f"trainer.devices={devices!r}: give a positive integer or auto")
    precision = trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    elif precision == "bf16":
        precision = "bf16-mixed"
    return Hardware(accelerator, devices, int(trainer.num_nodes), str(precision))


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # per device, per micro-batch
    eval_batch_size: int  # per device
    accumulate: int  # micro-batches per optimizer step


def plan_batches(loader: DictConfig, world_size: int, accumulate: int | None = None) -> BatchPlan:
    """global_batch_size = batch_size x devices x nodes x accumulation, exactly (SPEC 7.4).

    A null per-device size is ceil(global / world_size); `accumulate` (if given) must agree.
    """
    global_bs, eval_global = int(loader.global_batch_size), int(loader.eval_global_batch_size)
    batch_size = loader.batch_size or math.ceil(global_bs / world_size)
    eval_batch_size = loader.eval_batch_size or math.ceil(eval_global / world_size)
    per_step = batch_size * world_size
    if global_bs % per_step:
        raise UserError(
            f"loader.global_batch_size={global_bs} is not a multiple of loader.batch_size "
            f"x devices x nodes = {batch_size} x {world_size}; choose sizes that divide it"
        )
    derived = global_bs // per_step
    if accumulate is not None and accumulate != derived:
        raise UserError(
            f"trainer.accumulate_grad_batches={accumulate} disagrees with loader.global_batch_size"
            f"={global_bs} / ({batch_size} x {world_size}) = {derived}; leave it null"
        )
    return BatchPlan(int(batch_size), int(eval_batch_size), derived)


def validate(cfg: DictConfig, hw: Hardware) -> None:
    """Every check that can fail on user input, run before anything is written."""
    if cfg.mode not in MODES:
        raise UserError(f"mode={cfg.mode!r}: valid are {', '.join(MODES)}")
    length, block_size = int(cfg.model.length), int(cfg.block_size)
    if block_size < 1 or (length % block_size and cfg.mode != "sample_eval"):
        raise UserError(
            f"block_size={block_size} must be a positive divisor of model.length={length}"
        )
    backend = cfg.model.attn_backend
    if backend not in BACKENDS:
        raise UserError(f"model.attn_backend={backend!r}: valid are {', '.join(BACKENDS)}")
    if backend == "flex":
        if not flex_available():
            raise UserError("model.attn_backend=flex needs torch.nn.attention.flex_attention")
        if cfg.mode == "train" and hw.accelerator == "cpu":
            raise UserError(
                "model.attn_backend=flex cannot train on CPU (flex attention has no CPU "
                "backward); use model.attn_backend=sdpa"
            )
    if backend == "flash_attn":
        if not flash_available():
            raise UserError(
                "model.attn_backend=flash_attn needs CUDA and the flash-attn package "
                "(pip install -r requirements-gpu.txt); use sdpa or flex"
            )
        if cfg.algo.cross_attn or cfg.mode == "sample_eval" and cfg.algo.name == "bd3lm":
            raise UserError(
                "model.attn_backend=flash_attn cannot express the block-diffusion mask; "
                "use sdpa or flex for algo=bd3lm"
            )
    if cfg.algo.clip_search_widths and not cfg.algo.var_min:
        raise UserError("algo.clip_search_widths needs algo.var_min=true (algo=bd3lm)")
    if cfg.mode == "sample_eval":
        validate_sampling(cfg)
    if cfg.mode == "train":
        check_save_dir(str(cfg.checkpointing.save_dir))
    if cfg.mode == "train" and cfg.wandb is not None:
        check_wandb_credentials(cfg.wandb)
    if cfg.algo.backbone not in ("dit", "hf_dit"):
        raise UserError(f"algo.backbone={cfg.algo.backbone!r}: valid are dit, hf_dit")


def validate_sampling(cfg: DictConfig) -> None:
    sampling = cfg.sampling
    if int(cfg.algo.T) < 1:
        raise UserError(f"algo.T={cfg.algo.T}: sampling needs algo.T >= 1")
    if not 0 < float(sampling.nucleus_p) <= 1:
        raise UserError(f"sampling.nucleus_p={sampling.nucleus_p} must lie in (0, 1]")
    if sampling.kv_cache and cfg.algo.name not in ("bd3lm", "ar"):
        raise UserError(f"sampling.kv_cache=true needs algo=bd3lm or ar (got {cfg.algo.name})")
    if sampling.kv_cache and sampling.reencode_context:
        raise UserError(
            "sampling.reencode_context=true is the uncached variant; set kv_cache=false"
        )
    if sampling.prefix is not None and sampling.prefix_file is not None:
        raise UserError("give sampling.prefix or sampling.prefix_file, not both")
    has_prompt = sampling.prefix is not None or sampling.prefix_file is not None
    if has_prompt and cfg.algo.name in ("mdlm", "sedd"):
        raise UserError("sampling.prefix: prompts need algo=bd3lm or ar")
    if sampling.prefix_file is not None and not os.path.isfile(sampling.prefix_file):
        raise UserError(f"sampling.prefix_file={sampling.prefix_file}: no such file")
    length, block = int(cfg.model.length), effective_block_size(cfg)
    if cfg.algo.name not in ("mdlm", "sedd") and length % block:
        raise UserError(
            f"block_size={block} must divide the generation length model.length={length}"
        )
    if int(sampling.num_sample_batches) < 1:
        raise UserError("sampling.num_sample_batches must be >= 1")


def trained_length(cfg: DictConfig, loaded) -> int:
    """The sampling window: the context the checkpoint was trained with (our checkpoints store
    their config, HF ones `model_length`), never the `model.length` override (which is the
    generation length when sampling)."""
    if loaded.format == "ours":
        stored = loaded.raw.get("config", {}).get("model", {}).get("length")
    else:
        stored = loaded.meta.get("model_length")
    return int(stored) if stored else int(cfg.model.length)


def build_sampler_config(cfg: DictConfig, vocab, window: int):
    """samplers.SamplerConfig from the sampling/algo keys (raises UserError on bad values)."""
    from samplers import SamplerConfig

    length = int(cfg.model.length)
    block = effective_block_size(cfg)
    stride = None
    if cfg.algo.sampler == "analytic":  # SEDD: no blocks, the whole sequence at once
        if length > window:
            raise UserError(
                f"SEDD cannot sample beyond its context: model.length={length} > {window}"
            )
        block = 1
    elif cfg.algo.name == "mdlm":  # MDLM: one block of its window, then half-window strides
        block = min(block, window)
        stride = window // 2 if length > block else None
    try:
        return SamplerConfig(
            length=length,
            block_size=block,
            num_steps=int(cfg.algo.T),
            context=window,
            bos_id=vocab.bos_id,
            mask_id=vocab.mask_id,
            eos_id=vocab.eos_id,
            first_hitting=bool(cfg.sampling.first_hitting),
            nucleus_p=float(cfg.sampling.nucleus_p),
            kv_cache=bool(cfg.sampling.kv_cache),
            var_length=bool(cfg.sampling.var_length),
            reject_low_entropy=bool(cfg.sampling.reject_low_entropy),
            stride=stride,
            lazy_draws=bool(cfg.sampling.lazy_draws),
            fuse_commit=bool(cfg.sampling.fuse_commit),
            tokens_per_step=int(cfg.sampling.tokens_per_step),
            confidence_threshold=cfg.sampling.confidence_threshold,
            entropy_bound=cfg.sampling.entropy_bound,
            unmask_order=str(cfg.sampling.unmask_order),
        )
    except ValueError as err:
        raise UserError(str(err)) from None


def read_prompts(cfg: DictConfig) -> list[str] | None:
    """sampling.prefix (one prompt for every sample) or sampling.prefix_file (one per line)."""
    if cfg.sampling.prefix is not None:
        batch = plan_batches(cfg.loader, 1).eval_batch_size
        return [str(cfg.sampling.prefix)] * (batch * int(cfg.sampling.num_sample_batches))
    if cfg.sampling.prefix_file is not None:
        with open(cfg.sampling.prefix_file) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise UserError(f"sampling.prefix_file={cfg.sampling.prefix_file} has no prompts")
        return prompts
    return None


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


def check_save_dir(save_dir: str) -> None:
    """The checkpoint directory must be creatable and writable (fsspec URLs are not probed);
    nothing is created here."""
    if "://" in save_dir:
        return
    existing = os.path.abspath(os.path.join(save_dir, "checkpoints"))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(
            f"checkpointing.save_dir={save_dir} is not writable ({existing} is not a writable "
            "directory)"
        )


def check_wandb_credentials(wandb_cfg: DictConfig) -> None:
    """Online wandb needs an API key; fail now rather than deep inside the first logging call."""
    offline = wandb_cfg.get("offline", False) or wandb_cfg.get("mode") in ("offline", "disabled")
    if offline or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    netrc = pathlib.Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
        return
    raise UserError(
        "wandb: no API key (WANDB_API_KEY or `wandb login`); set wandb=null for CSV logs, "
        "+wandb.offline=true, or WANDB_MODE=offline"
    )


def effective_block_size(cfg: DictConfig) -> int:
    """K as the objective sees it: 1 for AR, L for SEDD, the configured block_size otherwise."""
    if cfg.algo.parameterization == "ar":
        return 1
    if cfg.algo.parameterization == "sedd":
        return int(cfg.model.length)
    return int(cfg.block_size)


def build_module(
    cfg: DictConfig,
    vocab_size: int,
    mask_id: int,
    seq_len: int | None = None,
    bos_eos: tuple[int, int] | None = None,
) -> Diffusion:
    """The LightningModule for `cfg`, freshly initialised (seed before calling). seq_len: the
    training context L when `model.length` means something else (the generation length).
    bos_eos: the inserted BOS/EOS ids, needed by the text8-crop path (2L training rows)."""
    seq_len = seq_len or int(cfg.model.length)
    block_size = min(effective_block_size(cfg), seq_len)
    crop = None
    if cfg.data.train == "text8-crop" and bos_eos is not None:
        insert = bool(cfg.data.get("insert_train_special", True))
        crop = DoubleLengthCrop(bos_eos[0], bos_eos[1], insert)
    try:
        noise = build_noise(cfg.noise.type)
        algorithm = build_algorithm(
            cfg.algo, cfg.training, noise, mask_id, seq_len, block_size, crop
        )
        model_cfg = {k: v for k, v in cfg.model.items() if k != "name"}
        backbone = build_backbone(model_cfg, vocab_size, causal=cfg.algo.parameterization == "ar")
    except ValueError as err:
        raise UserError(str(err)) from None
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
    return Diffusion(
        backbone,
        algorithm,
        optim,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        var_min=bool(cfg.algo.var_min),
        eps_min=float(cfg.training.sampling_eps_min),
        eps_max=float(cfg.training.sampling_eps_max),
        use_ema_for_eval=not cfg.eval.disable_ema,
        clip_grid=interval_grid(
            list(cfg.algo.clip_search_widths), float(cfg.algo.clip_search_delta), block_size
        ),
        clip_search_batches=int(cfg.algo.clip_search_batches),
        fix_clipping=bool(cfg.algo.fix_clipping),
        seed=int(cfg.seed),
    )


def build_loader(dataset, batch_size: int, shuffle: bool, seed: int, cfg: DictConfig, hw: Hardware):
    workers = cfg.loader.num_workers
    if workers is None:
        workers = 0 if hw.accelerator == "cpu" else min(8, len(os.sched_getaffinity(0)))
    pin = bool(cfg.loader.pin_memory) and hw.accelerator == "gpu"
    return make_loader(dataset, batch_size, shuffle, seed, num_workers=workers, pin_memory=pin)


def build_logger(cfg: DictConfig, run_dir: str):
    if cfg.wandb is None:
        return L.pytorch.loggers.CSVLogger(run_dir, name="logs")
    wandb_cfg = OmegaConf.to_container(cfg.wandb, resolve=True)
    return L.pytorch.loggers.WandbLogger(
        save_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True), **wandb_cfg
    )


def build_strategy(cfg: DictConfig, hw: Hardware):
    """`strategy=ddp` (the default; plain single-process when there is one device) or
    `strategy=fsdp` (CUDA only: Lightning refuses FSDP on CPU)."""
    name = cfg.strategy.name
    if name == "fsdp":
        if hw.accelerator != "gpu":
            raise UserError("strategy=fsdp needs CUDA GPUs (Lightning has no FSDP on CPU); use ddp")
        return L.pytorch.strategies.FSDPStrategy(
            sharding_strategy=cfg.strategy.get("sharding_strategy", "SHARD_GRAD_OP")
        )
    if name != "ddp":
        raise UserError(f"strategy={name}: valid are ddp, fsdp")
    if hw.world_size == 1:
        return "auto"
    return L.pytorch.strategies.DDPStrategy(
        find_unused_parameters=bool(cfg.strategy.find_unused_parameters)
    )


def build_callbacks(cfg: DictConfig) -> list:
    """The configured callbacks; `checkpointing.keep_last_k` turns the every-N-steps
    checkpoints into a rolling window of the k newest (null keeps all, as the reference)."""
    callbacks = []
    for name, node in cfg.callbacks.items():
        callback = hydra.utils.instantiate(node)
        keep = cfg.checkpointing.get("keep_last_k")
        if name == "checkpoint_every_n_steps" and keep is not None:
            if int(keep) < 1:
                raise UserError(f"checkpointing.keep_last_k={keep} must be >= 1 or null")
            callback = hydra.utils.instantiate(
                node, save_top_k=int(keep), monitor="step", mode="max"
            )
        callbacks.append(callback)
    callbacks.append(Preemption(cfg.checkpointing.resume_ckpt_path))
    callbacks.append(Throughput(int(cfg.trainer.log_every_n_steps)))
    return callbacks


def build_trainer(cfg: DictConfig, hw: Hardware, plan: BatchPlan, run_dir: str, fit: bool):
    """fit=True adds the checkpoint and run callbacks and the logger; evaluation runs get
    neither. Checkpoint files are written atomically."""
    strategy = build_strategy(cfg, hw)
    callbacks = build_callbacks(cfg) if fit else []
    plugins = [AtomicCheckpointIO()]
    if "SLURM_JOB_ID" in os.environ:  # our Preemption callback requeues, not Lightning's
        plugins.append(L.pytorch.plugins.environments.SLURMEnvironment(auto_requeue=False))
    derived = ("accelerator", "devices", "num_nodes", "precision", "accumulate_grad_batches")
    passthrough = {k: v for k, v in cfg.trainer.items() if k not in (*derived, "deterministic")}
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
