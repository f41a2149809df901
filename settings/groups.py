"""The typed settings of a run: one frozen dataclass per config group, `RunSettings` for the
whole config. Each field is a key (config_keys says how a field declares one); the schema
(settings/schema.py) is derived from these declarations and `RunSettings` is what
`settings.validate` returns. Groups declared elsewhere: `algo` by each objective's registry
entry (registry.spec.AlgoSettings and its subclasses), `data` by the data package
(data.config.DataSettings).

A group whose keys depend on a choice has one class per choice: `algo` per objective
(`algo.name`), `model` per backbone (`model.backbone`: MODELS), `strategy` and `lr_scheduler`
per `name` (STRATEGIES, LR_SCHEDULERS). Keys the run passes through are typed extras: the
trainer's `lightning` (any other keyword of lightning.Trainer), `wandb` (keywords of
Lightning's WandbLogger or wandb.init) and `callbacks` (Hydra nodes, checked by building them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from config_keys import setting
from data.config import DataSettings
from models import dit_config
from models.attention import BACKENDS
from noise_schedule import SCHEDULES
from registry import OBJECTIVES, AlgoSettings
from sampling.config import UNMASK_ORDERS

frozen = dataclasses.dataclass(frozen=True, kw_only=True)

PRECISION_NAMES = (
    "auto", "32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true",
    "64-true", "64",
)  # fmt: skip
# Trainer keywords the run sets itself (from other keys, or its own objects)
TRAINER_OWNED = (
    "strategy", "callbacks", "logger", "plugins", "default_root_dir", "enable_checkpointing",
)  # fmt: skip
WANDB_KEYS = (
    "project", "name", "id", "notes", "group", "job_type", "tags", "entity", "offline", "mode",
    "anonymous", "log_model", "prefix", "checkpoint_name", "version", "dir", "resume", "reinit",
    "settings", "save_code", "allow_val_change", "monitor_gym", "sync_tensorboard", "fork_from",
    "resume_from", "config_exclude_keys", "config_include_keys", "force", "magic",
    "add_file_policy",
)  # fmt: skip


@frozen
class LoaderSettings:
    global_batch_size: int = setting(lo=1)
    eval_global_batch_size: int = setting(lo=1)
    batch_size: int | None = setting(None, lo=1)  # per device; None: from the global size
    eval_batch_size: int | None = setting(None, lo=1)
    num_workers: int | None = setting(None, lo=0)  # None: 0 on CPU, else min(8, CPUs)
    pin_memory: bool


@frozen
class SamplingSettings:
    """sample_eval's sampler options (sampling.SamplerConfig checks the same ranges), prompts
    and where samples go."""

    num_sample_batches: int = setting(lo=1)
    var_length: bool
    reject_low_entropy: bool
    logdir: str | None = None
    nucleus_p: float = setting(lo=0, hi=1, lo_open=True)
    first_hitting: bool
    kv_cache: bool
    reencode_context: bool
    prefix: Any = None  # a prompt (any value; its text is the prompt)
    prefix_file: str | None = None
    fuse_commit: bool
    tokens_per_step: int = setting(lo=1)
    confidence_threshold: float | None = setting(None, lo=0, hi=1, lo_open=True)
    entropy_bound: float | None = setting(None, lo=0, lo_open=True)
    eb_gamma: float | None = setting(None, lo=0)
    unmask_order: Literal[UNMASK_ORDERS]


@frozen
class TrainingSettings:
    ema: float = setting(lo=0, hi=1, hi_open=True)
    antithetic_sampling: bool
    resample: bool
    sampling_eps_min: float = setting(lo=0, hi=1, lo_open=True)
    sampling_eps_max: float = setting(lo=0, hi=1, lo_open=True)
    from_pretrained: str | None = None
    eval_nll: bool
    compile: bool


@frozen
class EvalSettings:
    # None: the backbone as it is built (a pretrained one's own weights, ModelSettings.source)
    checkpoint_path: str | None
    disable_ema: bool
    gen_ppl_eval_model_name_or_path: str | None = None
    sanity_ppl_max: float | None = setting(None, lo=1)
    mc_samples: int = setting(lo=1)  # ppl_eval: NELBO draws averaged per row


@frozen
class OptimizerSettings:
    weight_decay: float = setting(lo=0)
    lr: float = setting(lo=0, lo_open=True)
    beta1: float = setting(lo=0, hi=1, hi_open=True)
    beta2: float = setting(lo=0, hi=1, hi_open=True)
    eps: float = setting(lo=0, lo_open=True)


def lightning_trainer_keywords() -> tuple[str, ...]:
    """The other keywords of lightning.Trainer a user may pass through `trainer.*`."""
    import inspect

    import lightning as L

    names = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    declared = {f.name for f in dataclasses.fields(TrainerSettings)}
    return tuple(sorted(names - set(TRAINER_OWNED) - declared))


TRAINER_PASSED = (
    "gradient_clip_val", "gradient_clip_algorithm", "num_sanity_val_steps", "max_steps",
    "log_every_n_steps", "limit_train_batches", "limit_val_batches", "val_check_interval",
    "check_val_every_n_epoch", "max_epochs",
)  # fmt: skip


@frozen
class TrainerSettings:
    """lightning.Trainer's keys the run reads or checks (a key left out takes Lightning's
    default, or the run's where it decides: precision, deterministic, the progress bar and
    model summary), and any other keyword of lightning.Trainer (`lightning`)."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    num_nodes: int = setting(1, lo=1)
    devices: int | Literal["auto"] = setting("auto", lo=1)
    accumulate_grad_batches: int | None = setting(None, lo=1)  # None: from the batch sizes
    gradient_clip_val: float | None = setting(None, lo=0)
    gradient_clip_algorithm: Literal["norm", "value"] | None = None
    precision: Literal[PRECISION_NAMES] = "auto"
    num_sanity_val_steps: int = setting(2, lo=-1)
    max_steps: int = setting(lo=1)
    log_every_n_steps: int = setting(50, lo=1)
    limit_train_batches: int | float = setting(1.0, lo=1)  # 0 would train on nothing
    limit_val_batches: int | float = setting(1.0, lo=0)  # 0: no validation
    val_check_interval: int | float | None = setting(None, lo=1)  # None: every epoch
    check_val_every_n_epoch: int | None = setting(1, lo=1)
    deterministic: bool | Literal["warn"] | None = None  # None: true on CPU
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"
    enable_progress_bar: bool | None = None  # None: on a terminal
    enable_model_summary: bool | None = None  # None: with verbose=true
    max_epochs: int | Literal[-1] | None = setting(None, lo=1)  # -1: no limit
    lightning: Mapping[str, Any] = setting(
        default_factory=dict,
        extras=True,
        keys=lightning_trainer_keywords,
        listing="the keywords of lightning.Trainer, except those the run sets: "
        + ", ".join(TRAINER_OWNED),
    )

    def keywords(self) -> dict[str, Any]:
        """lightning.Trainer's keywords passed as they are: every key but those the run derives
        (accelerator, devices, num_nodes, precision, accumulate_grad_batches) or decides
        (deterministic, float32_matmul_precision, the progress bar, the model summary), and
        the other keywords of `lightning`."""
        return {**{name: getattr(self, name) for name in TRAINER_PASSED}, **self.lightning}


@frozen
class CheckpointingSettings:
    save_dir: str  # a local path or an fsspec URL
    resume_from_ckpt: bool
    resume_ckpt_path: str
    keep_last_k: int | None = setting(None, lo=1)  # None: keep every N-step checkpoint


@frozen
class NoiseSettings:
    type: Literal[tuple(SCHEDULES)]


# ----------------------------------------------------------------------------------------------
# Groups with one class per choice
# ----------------------------------------------------------------------------------------------
@frozen
class ModelSettings:
    """The keys every backbone's `model` group has (configs/model/*.yaml)."""

    name: str
    backbone: str  # the choice: models.backbone.BACKBONES
    length: int = setting(lo=1)  # L: the training context (sample_eval: the generation length)
    attn_backend: str

    # training.compile=true compiles its transformer blocks (DiT.compile_blocks)
    compiles_blocks: ClassVar[bool] = False

    def check(self, causal: bool) -> None:
        """ValueError when the backbone cannot take these shapes (`causal`: token-causal)."""

    def source(self) -> tuple[str, str] | None:
        """(key, value) of the pretrained model the backbone is built from, which brings its
        tokenizer (the run's vocabulary: models.backbone.BackboneSpec.vocab, recorded as
        data.tokenizer_name_or_path) and its weights (evaluated as they are without
        eval.checkpoint_path); None: a randomly initialised backbone over the data tokenizer."""
        return None

    def causal_clean_stream(self) -> bool:
        """Whether each token of the clean stream x_0 (the two-stream input's second half)
        sees only the clean tokens before it, so that its rows are next-token logits (what
        BD3-LM's auxiliary AR loss reads); False: block-causal (the paper's DiT)."""
        return False

    def reference_heads(self) -> int | None:
        """The attention heads a checkpoint that does not store them is read with (None: the
        file must say)."""
        return None


@frozen
class DiTSettings(ModelSettings):
    """The DiT (models/dit.py)."""

    hidden_size: int = setting(lo=1)
    cond_dim: int = setting(lo=1)
    n_blocks: int = setting(lo=1)
    n_heads: int = setting(lo=1)
    dropout: float = setting(lo=0, hi=1, hi_open=True)
    adaln: bool  # adaLN for AR backbones too (diffusion backbones always have it)
    attn_backend: Literal[BACKENDS]

    compiles_blocks: ClassVar[bool] = True

    def check(self, causal: bool) -> None:
        dit_config(dataclasses.asdict(self), vocab_size=1, causal=causal)

    def reference_heads(self) -> int:
        return self.n_heads


@frozen
class RobertaSettings(DiTSettings):
    """SSD-LM's RoBERTa (models/ssdlm.py): the DiT's keys; it reads hidden_size, n_blocks,
    n_heads and dropout (cond_dim and adaln are unused)."""


@frozen
class HFCausalSettings(ModelSettings):
    """A pretrained Hugging Face causal LM as the backbone (models/hf_causal/)."""

    pretrained: str  # a directory, hub id, .gguf file or smollm2-135m (models/pretrained.py)
    token_shift: bool = True  # read position i's logits from the hidden state at i - 1
    clean_attention: Literal["causal", "block"] = "causal"  # the x_0 stream's attention
    attn_backend: Literal["sdpa", "flex"] = "sdpa"
    gradient_checkpointing: bool = False  # dropout: the pretrained model's own config

    def source(self) -> tuple[str, str]:
        return "model.pretrained", self.pretrained

    def causal_clean_stream(self) -> bool:
        return self.clean_attention == "causal"


MODELS: dict[str, type[ModelSettings]] = {
    "dit": DiTSettings,
    "roberta": RobertaSettings,
    "hf_causal": HFCausalSettings,
}


@frozen
class StrategySettings:
    name: str


@frozen
class DDPSettings(StrategySettings):
    find_unused_parameters: bool
    force: bool  # the DDP strategy on one device too (plain single-process otherwise)


@frozen
class FSDPSettings(StrategySettings):
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"]


STRATEGIES: dict[str, type[StrategySettings]] = {"ddp": DDPSettings, "fsdp": FSDPSettings}


@frozen
class LRSchedulerSettings:
    name: str

    def schedule(self) -> dict[str, Any]:
        """diffusion.OptimSettings's keywords for this schedule besides its name."""
        return {}


@frozen
class ConstantWarmupSettings(LRSchedulerSettings):
    num_warmup_steps: int = setting(lo=0)

    def schedule(self) -> dict[str, Any]:
        return {"warmup_steps": self.num_warmup_steps}


@frozen
class CosineDecayWarmupSettings(LRSchedulerSettings):
    warmup_t: int | None = setting(None, lo=0)  # None: 0.1 x trainer.max_steps
    warmup_lr_init: float = setting(lo=0)
    lr_min: float = setting(lo=0)

    def schedule(self) -> dict[str, Any]:
        return {
            "warmup_t": self.warmup_t,
            "warmup_lr_init": self.warmup_lr_init,
            "lr_min": self.lr_min,
        }


LR_SCHEDULERS: dict[str, type[LRSchedulerSettings]] = {
    "constant": LRSchedulerSettings,
    "constant_warmup": ConstantWarmupSettings,
    "cosine_decay_warmup": CosineDecayWarmupSettings,
}


def objective_settings() -> dict[str, type[AlgoSettings]]:
    """{algo.name: its registry entry's settings class}."""
    return {name: spec.settings for name, spec in OBJECTIVES.items()}


@frozen
class RunSettings:
    """The whole config, typed (settings.validate's result)."""

    mode: Literal["train", "ppl_eval", "sample_eval"]
    # Lightning's seed_everything takes numpy's range (else 0)
    seed: int = setting(lo=0, hi=2**32 - 1)
    block_size: int = setting(lo=1)
    verbose: bool  # console: the resolved config and the model summary
    loader: LoaderSettings
    sampling: SamplingSettings
    training: TrainingSettings
    eval: EvalSettings
    optim: OptimizerSettings
    trainer: TrainerSettings
    checkpointing: CheckpointingSettings
    algo: AlgoSettings = setting(choose=objective_settings)
    model: ModelSettings = setting(choose=lambda: MODELS, choose_by="backbone")
    noise: NoiseSettings
    data: DataSettings
    strategy: StrategySettings = setting(choose=lambda: STRATEGIES)
    lr_scheduler: LRSchedulerSettings = setting(choose=lambda: LR_SCHEDULERS)
    wandb: Mapping[str, Any] | None = setting(None, keys=lambda: WANDB_KEYS)
    callbacks: Mapping[str, Mapping[str, Any]] = setting(default_factory=dict)
