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
from utils import UserError, get_logger

MODES = ("train", "ppl_eval", "sample_eval")
log = get_logger("bd3lms")


@dataclasses.dataclass(frozen=True)
class Hardware:
    accelerator: str  # "cpu" | "gpu"
    devices: int  # per node
    num_nodes: int
    precision: str
    precision_choice: str | None = None  # why `trainer.precision=auto` chose it (None: set)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


PRECISIONS = {  # accepted values -> Lightning's names
    "auto": "auto",
    "bf16-true": "bf16-true",
    "16-true": "16-true",
    "64-true": "64-true",
    "64": "64-true",
    "32-true": "32-true",
    "32": "32-true",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
}
MATMUL_PRECISIONS = ("highest", "high", "medium")


def auto_precision(accelerator: str, released_checkpoint: bool) -> tuple[str, str]:
    """`trainer.precision=auto` -> (precision, why). CPU: float32. GPU: bf16-mixed where the
    card computes bf16 natively (Ampere and newer), else 16-mixed. Evaluating a released HF
    checkpoint (or `algo.backbone=hf_dit`): float32, the precision of the paper's likelihoods
    and samples."""
    if accelerator == "cpu":
        return "32-true", "CPU"
    if released_checkpoint:
        return "32-true", "a released checkpoint is evaluated in float32, as in the paper"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed", "the GPU computes bf16 natively"
    return "16-mixed", "the GPU has no native bf16"


def evaluates_released(cfg: DictConfig, loaded) -> bool:
    """An evaluation of a released checkpoint: an HF-format one (directory or hub id), or any
    checkpoint with `algo.backbone=hf_dit` (the reference's switch for them)."""
    if loaded is None or cfg.mode not in ("ppl_eval", "sample_eval"):
        return False
    return cfg.algo.backbone == "hf_dit" or loaded.format == "hf"


def resolve_hardware(trainer: DictConfig, released_checkpoint: bool = False) -> Hardware:
    """`auto` values: CUDA when available (all visible GPUs), else 1 CPU; the precision as
    `auto_precision` picks it (the reason in `precision_choice`, which main.run logs)."""
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
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise UserError(f"trainer.devices={devices!r}: give a positive integer or auto")
    precision = PRECISIONS.get(str(trainer.precision))
    if precision is None:
        raise UserError(
            f"trainer.precision={trainer.precision!r}: valid are {', '.join(PRECISIONS)}"
        )
    why = None
    if precision == "auto":
        precision, why = auto_precision(accelerator, released_checkpoint)
    if precision == "16-mixed" and accelerator == "cpu":
        raise UserError(
            "trainer.precision=16-mixed needs a GPU (no float16 autocast training on CPU); "
            "use bf16-mixed or 32-true"
        )
    return Hardware(accelerator, devices, int(trainer.num_nodes), precision, why)


def configure_float32_matmul(trainer: DictConfig) -> None:
    """`trainer.float32_matmul_precision`: highest (exact float32 matmuls, torch's default),
    high (TF32 tensor cores on Ampere and newer) or medium (bf16); float32 work only."""
    value = trainer.get("float32_matmul_precision") or "highest"
    if value not in MATMUL_PRECISIONS:
        raise UserError(
            f"trainer.float32_matmul_precision={value!r}: valid are {', '.join(MATMUL_PRECISIONS)}"
        )
    torch.set_float32_matmul_precision(value)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # per device, per micro-batch
    eval_batch_size: int  # per device
    accumulate: int  # micro-batches per optimizer step


def plan_batches(loader: DictConfig, world_size: int, accumulate: int | None = None) -> BatchPlan:
    """global_batch_size = batch_size x devices x nodes x accumulation, exactly (SPEC 7.4).

    A null per-device size is ceil(global / world_size) (the evaluation one must split exactly);
    `accumulate` (if given) must agree.
    """
    global_bs, eval_global = int(loader.global_batch_size), int(loader.eval_global_batch_size)
    batch_size = loader.batch_size or math.ceil(global_bs / world_size)
    per_step = batch_size * world_size
    if global_bs % per_step:
        raise UserError(
            f"loader.global_batch_size={global_bs} is not a multiple of loader.batch_size "
            f"x devices x nodes = {batch_size} x {world_size}; choose sizes that divide it"
        )
    if loader.eval_batch_size is None and eval_global % world_size:
        raise UserError(
            f"loader.eval_global_batch_size={eval_global} does not split over {world_size} "
            "processes (evaluation numbers would depend on the process count); choose a "
            "multiple of the device count or set loader.eval_batch_size"
        )
    eval_batch_size = loader.eval_batch_size or eval_global // world_size
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
    validate_strategy(cfg, hw)


def validate_strategy(cfg: DictConfig, hw: Hardware) -> None:
    """strategy=fsdp needs CUDA, clips by norm only (through FSDP's own clip_grad_norm_, see
    Diffusion.configure_gradient_clipping) and has no EMA: ours keeps full copies of the
    parameters by name, which is not shard-aware."""
    name = cfg.strategy.name
    if name not in ("ddp", "fsdp"):
        raise UserError(f"strategy={name}: valid are ddp, fsdp")
    if name != "fsdp":
        return
    if hw.accelerator != "gpu":
        raise UserError("strategy=fsdp needs CUDA GPUs (Lightning has no FSDP on CPU); use ddp")
    if float(cfg.training.ema) > 0:
        raise UserError(
            f"strategy=fsdp with training.ema={cfg.training.ema}: the EMA is not shard-aware "
            "(it keeps full parameter copies); set training.ema=0 or use strategy=ddp"
        )
    if cfg.training.get("compile", False):
        raise UserError(
            "strategy=fsdp with training.compile=true: the compiled blocks would bypass the FSDP "
            "units; set training.compile=false or use strategy=ddp"
        )
    algorithm = cfg.trainer.get("gradient_clip_algorithm")
    if algorithm not in (None, "norm"):
        raise UserError(
            f"strategy=fsdp with trainer.gradient_clip_algorithm={algorithm}: FSDP clips by "
            "norm only; set trainer.gradient_clip_algorithm=norm"
        )


def validate_sampling(cfg: DictConfig) -> None:
    sampling = cfg.sampling
    if int(cfg.algo.T) < 1:
        raise UserError(f"algo.T={cfg.algo.T}: sampling needs algo.T >= 1")
    if not 0 < float(sampling.nucleus_p) <= 1:
        raise UserError(f"sampling.nucleus_p={sampling.nucleus_p} must lie in (0, 1]")
    if sampling.kv_cache and cfg.algo.name not in ("bd3lm", "ar"):
        raise UserError(f"sampling.kv_cache=true needs algo=bd3lm or ar (got {cfg.algo.name})")
    if sampling.kv_cache and cfg.algo.time_conditioning and cfg.algo.name == "bd3lm":
        raise UserError(
            "sampling.kv_cache=true needs algo.time_conditioning=false: a time-conditioned "
            "BD3-LM re-encodes its context at every step's t; set sampling.kv_cache=false"
        )
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


def sampling_options(cfg: DictConfig) -> dict:
    """The sampler's options (sampling.SamplerConfig fields) the config sets."""
    sampling = cfg.sampling
    return dict(
        num_steps=int(cfg.algo.T),
        first_hitting=bool(sampling.first_hitting),
        nucleus_p=float(sampling.nucleus_p),
        kv_cache=bool(sampling.kv_cache),
        var_length=bool(sampling.var_length),
        reject_low_entropy=bool(sampling.reject_low_entropy),
        lazy_draws=bool(sampling.lazy_draws),
        fuse_commit=bool(sampling.fuse_commit),
        tokens_per_step=int(sampling.tokens_per_step),
        confidence_threshold=sampling.confidence_threshold,
        entropy_bound=sampling.entropy_bound,
        eb_gamma=sampling.eb_gamma,
        unmask_order=str(sampling.unmask_order),
    )


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
            auto_wrap_policy=fsdp_wrap_policy(),
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


def fsdp_wrap_policy():
    """FSDP auto-wrap policy: every DiTBlock is a unit of its own (parameters gathered one
    block at a time); embedding, timestep map and output layer stay with the root."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from models.dit import DiTBlock

    return ModuleWrapPolicy({DiTBlock})


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
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
    derived = ("accelerator", "devices", "num_nodes", "precision", "accumulate_grad_batches")
    ours = ("deterministic", "float32_matmul_precision")
    passthrough = {k: v for k, v in cfg.trainer.items() if k not in (*derived, *ours)}
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
