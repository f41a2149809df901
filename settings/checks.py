"""Rules across keys, checked once before anything is written: `check_config` those of the
typed settings alone (the objective's network, its shape, the strategy, trainer keys, paths,
callbacks, the sampler's options), `check_objective` what the objective built from them can
do (its capabilities, training rows, attention backend, clip interval and sampler; see
settings/sampling.py).

Each check raises UserError with one line naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from omegaconf import DictConfig

import registry
from algorithms.base import (
    DEFAULT_EPS_MAX,
    DEFAULT_EPS_MIN,
    DoubleLengthCrop,
    check_resample_interval,
    f32_equal,
)
from algorithms.clip_search import interval_grid
from models.attention import flash_available, flex_available
from models.backbone import backbone_spec
from noise_schedule import build_noise
from settings.groups import RunSettings
from settings.hardware import Hardware
from settings.paths import (
    check_creatable,
    check_wandb_credentials,
    check_writable,
    yaml_value,
)
from settings.sampling import check_sampler, check_sampling_keys
from utils import UserError, filesystem, get_logger

log = get_logger("bd3lms")


def settle_block_size(
    cfg: DictConfig,
    run: RunSettings,
    context: int,
    context_name: str,
    command_line: Collection[str] = (),
) -> RunSettings:
    """`run` with `block_size` the K the run uses, also set in `cfg` so that
    config_resolved.yaml and checkpoints record it: an objective that fixes K (its registry
    entry's `block_size`: AR 1, MDLM and SEDD the context) takes its own, with a log line when
    the composed config said otherwise (an experiment's K for BD3-LM); UserError when the
    command line (`command_line`: the keys it sets) asked for another K, or when a block is
    longer than the context (`context` tokens, `context_name` in messages)."""
    spec, given = objective_spec(run), run.block_size
    K = spec.block_size(run.algo, context)
    if K is None:  # K is the objective's own parameter
        if given > context:
            raise UserError(
                f"block_size={given} exceeds {context_name} ({context} tokens): a block is at "
                "most the context; give a block size that divides it"
            )
        return run
    if given == K:
        return run
    equation = "K = 1" if K == 1 else f"K = {context_name} = {K}"
    why = f"algo={spec.name} {spec.fixed_k_reason} ({equation})"
    if "block_size" in command_line:
        raise UserError(f"block_size={given}: {why}; leave block_size out or set it to {K}")
    log.info("block_size %d of the config -> %d: %s", given, K, why)
    cfg.block_size = K
    return dataclasses.replace(run, block_size=K)


def settle_tokenizer(
    cfg: DictConfig, run: RunSettings, command_line: Collection[str] = ()
) -> RunSettings:
    """`run` with data.tokenizer_name_or_path the tokenizer its backbone brings
    (ModelSettings.source: model.pretrained for hf_causal), also set in `cfg` so that
    config_resolved.yaml, checkpoints and the token caches' names (data.options.cache_name)
    record it; unchanged for a backbone over the data tokenizer. UserError when the command
    line (`command_line`: the keys it sets) named another tokenizer."""
    source = run.model.source()
    given = run.data.tokenizer_name_or_path
    if source is None or given == source[1]:
        return run
    key, name = source
    if "data.tokenizer_name_or_path" in command_line:
        raise UserError(
            f"data.tokenizer_name_or_path={given}: model.backbone={run.model.backbone} brings "
            f"its own tokenizer ({key}={name}); leave data.tokenizer_name_or_path out"
        )
    cfg.data.tokenizer_name_or_path = name
    return dataclasses.replace(run, data=dataclasses.replace(run.data, tokenizer_name_or_path=name))


def objective_spec(run: RunSettings) -> registry.ObjectiveSpec:
    """The registry entry of `algo=` (the schema checked the name)."""
    return registry.objective_spec(run.algo.name)


def text8_crop(run: RunSettings, bos_id: int, eos_id: int) -> DoubleLengthCrop | None:
    """The objective's crop step for training rows of 2L tokens (data.train=text8-crop; the
    vocabulary's inserted BOS / EOS), else None."""
    if run.data.train != "text8-crop":
        return None
    return DoubleLengthCrop(bos_id, eos_id, run.data.insert_train_special)


def build_objective(run: RunSettings, seq_len: int, mask_id: int = 0, crop=None):
    """The objective of `run` for a context of `seq_len` tokens, built by its registry entry.
    `block_size` reaches it here and nowhere else: an objective that fixes K takes its own
    (whatever `block_size` says: `settle_block_size` records it), BD3-LM and SSD-LM
    `block_size`. mask_id: the vocabulary's (0 where only the capabilities are read)."""
    try:
        noise = build_noise(run.noise.type)
        return registry.build_objective(
            run.algo, run.training, noise, mask_id, seq_len, run.block_size, crop
        )
    except ValueError as err:
        raise UserError(str(err)) from None


def check_config(run: RunSettings, hw: Hardware) -> None:
    """Every cross-key rule of `run` that needs neither the objective nor a checkpoint."""
    spec = objective_spec(run)
    if run.algo.parameterization != spec.parameterization:  # what checkpoints record
        raise UserError(
            f"algo.parameterization={run.algo.parameterization}: algo={spec.name} is "
            f"algo.parameterization={spec.parameterization}"
        )
    if run.model.backbone not in spec.backbones:
        raise UserError(
            f"model.backbone={run.model.backbone}: algo={spec.name} runs on model.backbone="
            f"{' or '.join(spec.backbones)}"
        )
    try:
        run.model.check(causal=spec.causal)
    except ValueError as err:
        raise UserError(str(err)) from None
    check_backbone_abilities(run)
    training = run.training
    if training.sampling_eps_min > training.sampling_eps_max:
        raise UserError(
            f"training.sampling_eps_min={training.sampling_eps_min} exceeds "
            f"training.sampling_eps_max={training.sampling_eps_max}"
        )
    search = run.algo.clip_search()
    if search is not None and search.widths and not run.algo.var_min:
        raise UserError("algo.clip_search_widths needs algo.var_min=true (algo=bd3lm)")
    check_strategy(run, hw)
    check_trainer(run)
    check_creatable("data.cache_dir", run.data.cache_dir)
    if run.mode == "train":
        check_writable("checkpointing.save_dir", run.checkpointing.save_dir)
        resume = run.checkpointing.resume_ckpt_path
        if run.checkpointing.resume_from_ckpt and "://" in resume:
            filesystem(resume, "checkpointing.resume_ckpt_path")  # its backend installed
        check_callbacks(run)
        if run.wandb is not None:
            check_wandb_credentials(run.wandb)


def check_backbone_abilities(run: RunSettings) -> None:
    """What the objective and training keys ask of `model.backbone`: time conditioning (its
    registry entry's time_conditioned), compiled blocks (ModelSettings.compiles_blocks), and
    an evaluation without eval.checkpoint_path (a pretrained backbone's own weights,
    ModelSettings.source)."""
    backbone = run.model.backbone
    if run.algo.time_conditioning and not backbone_spec(backbone).time_conditioned:
        raise UserError(
            f"algo.time_conditioning=true: model.backbone={backbone} does not read the noise "
            "level; set algo.time_conditioning=false"
        )
    if run.training.compile and not run.model.compiles_blocks:
        raise UserError(
            f"training.compile=true compiles DiT blocks; model.backbone={backbone} has none, "
            "set training.compile=false"
        )
    if run.mode != "train" and run.eval.checkpoint_path is None and run.model.source() is None:
        raise UserError(
            f"eval.checkpoint_path=null: model.backbone={backbone} is randomly initialised; "
            "give a checkpoint (our .ckpt, an HF directory or a hub id)"
        )


def check_pretrained_source(run: RunSettings, loaded, command_line: Collection[str] = ()) -> None:
    """An evaluated checkpoint (`loaded`: eval.checkpoint_path read) of a pretrained backbone is
    read into the model its run was trained from (ModelSettings.source: model.pretrained, which
    brings the tokenizer and the architecture): UserError when its stored config names another
    and the command line (`command_line`: the keys it sets) did not ask for it; a warning when
    it did (the same model elsewhere)."""
    source = run.model.source()
    if source is None or loaded is None or loaded.format != "ours":
        return
    key, value = source
    stored = ((loaded.raw.get("config") or {}).get("model") or {}).get(key.split(".", 1)[1])
    if stored is None or stored == value:
        return
    trained = f"eval.checkpoint_path={loaded.source} was trained from {key}={stored}"
    if key in command_line:
        log.warning("%s; this run reads %s=%s", trained, key, value)
        return
    raise UserError(f"{trained}, not {value}; set {key}={stored}")


def check_clean_stream(run: RunSettings, objective) -> None:
    """An objective that reads the clean stream's rows as next-token logits (BD3-LM's
    auxiliary AR loss, algo.ar_loss_weight > 0: its `ar_loss_weight`) needs a backbone whose
    clean stream is token-causal (ModelSettings.causal_clean_stream)."""
    weight = getattr(objective, "ar_loss_weight", 0.0)
    if run.mode != "train" or not weight or run.model.causal_clean_stream():
        return
    raise UserError(
        f"algo.ar_loss_weight={weight} reads next-token logits of the clean stream, which need "
        "it token-causal (model=hf_causal with model.clean_attention=causal); the clean stream "
        f"of this model.backbone={run.model.backbone} is block-causal. Set algo.ar_loss_weight=0"
    )


def check_objective(run: RunSettings, objective, hw: Hardware, window: int | None = None) -> None:
    """What `run` asks of its objective (built for it: build_objective): ppl_eval, the training
    rows, the attention backend, the entry's own rules, the clip interval, and sample_eval's
    sampler (for a checkpoint trained on `window` tokens, when known)."""
    spec = objective_spec(run)
    if run.mode == "ppl_eval" and not objective.capabilities.ppl_eval:
        raise UserError(
            f"mode=ppl_eval: algo={spec.name} has no likelihood bound to evaluate; use "
            "mode=sample_eval (generative perplexity)"
        )
    if run.mode == "train":
        try:
            objective.check_rows(run.model.length)
        except ValueError as err:
            raise UserError(str(err)) from None
    if spec.check is not None:
        spec.check(run, objective)
    check_clean_stream(run, objective)
    check_backend(run, hw, objective)
    if run.mode != "sample_eval":  # training and validation draw t from these intervals
        check_clip_intervals(run, objective)
    if run.mode == "sample_eval":
        check_sampling_keys(run, objective)
        if window is not None:
            check_sampler(run, objective, window)


def check_clip_intervals(run: RunSettings, objective) -> None:
    """The intervals [eps_min, eps_max] t is drawn from: with algo.var_min, the configured
    one (the clip buffers' start) and every interval of the clip search's grid (each measured
    at validation, and the chosen one trained on: algorithms.clip_search.interval_grid, used
    when it holds more than one). Without, every objective trains on [1e-3, 1], so the keys
    of the interval are refused when set. A grid interval must end by t = 1. With
    training.resample, q_xt redraws a block of K tokens until its masked fraction, a multiple
    of 1/K, lies in the interval, and refuses an interval that holds none
    (algorithms.base.check_resample_interval): at step 0 for the configured interval, at the
    first validation for the grid's."""
    training, algo = run.training, run.algo
    eps_min, eps_max = training.sampling_eps_min, training.sampling_eps_max
    default = f32_equal(eps_min, DEFAULT_EPS_MIN) and f32_equal(eps_max, DEFAULT_EPS_MAX)
    if not (algo.var_min and objective.capabilities.clip_interval):  # no learned interval
        which = f"algo={algo.name} with algo.var_min={yaml_value(algo.var_min)}"
        if not default:
            raise UserError(
                f"training.sampling_eps_min={eps_min}, training.sampling_eps_max={eps_max}: "
                f"{which} trains on t in [{DEFAULT_EPS_MIN}, {DEFAULT_EPS_MAX}] (the clip "
                "interval is BD3-LM's, algo.var_min=true); leave both at their defaults"
            )
        if training.resample:
            raise UserError(
                f"training.resample=true: {which} trains on t in [{DEFAULT_EPS_MIN}, "
                f"{DEFAULT_EPS_MAX}], where nothing is resampled; set training.resample=false"
            )
        return
    K, search = objective.block_size, algo.clip_search()
    grid = interval_grid(list(search.widths), search.delta, K) if search is not None else []
    for low, high in grid if len(grid) > 1 else []:
        if high > 1:
            raise UserError(
                f"algo.clip_search_delta={search.delta}: the clip search's grid reaches the "
                f"interval [{low:.4g}, {high:.4g}] (width {high - low:.4g}), beyond t = 1; "
                "choose a delta that divides 1 - width for every width (the paper: 0.05)"
            )
    if not training.resample:
        return
    if _resample_refused(eps_min, eps_max, K):
        raise UserError(
            f"training.sampling_eps_min={eps_min}, training.sampling_eps_max={eps_max}: with "
            f"training.resample=true the masked fraction of a block of K={K} tokens must lie "
            f"in the interval and no multiple of 1/{K} does; widen the interval or set "
            "training.resample=false"
        )
    for low, high in grid if len(grid) > 1 else []:
        if _resample_refused(low, high, K):
            raise UserError(
                f"algo.clip_search_widths={list(search.widths)}: the clip search's "
                f"interval [{low:.4g}, {high:.4g}] holds no multiple of 1/{K}, the masked "
                f"fractions of a block of K={K} tokens that training.resample=true redraws "
                f"into it; use widths of at least 1/{K} or training.resample=false"
            )


def _resample_refused(low: float, high: float, block_size: int) -> bool:
    """Whether q_xt refuses to resample blocks of `block_size` tokens into [low, high] (the
    default interval, which it does not resample, holds j = K)."""
    try:
        check_resample_interval(low, high, block_size)
    except ValueError:
        return True
    return False


def check_trainer(run: RunSettings) -> None:
    """Trainer and schedule keys that only make sense together."""
    trainer = run.trainer
    interval = trainer.val_check_interval
    if isinstance(interval, float) and trainer.check_val_every_n_epoch is None:
        raise UserError(
            f"trainer.val_check_interval={interval}: a fraction of an epoch needs "
            "trainer.check_val_every_n_epoch (without, validation counts micro-batches across "
            "epochs); give an integer"
        )
    limit = trainer.limit_val_batches
    if run.mode == "ppl_eval" and limit == 0:
        raise UserError(
            f"trainer.limit_val_batches={limit}: mode=ppl_eval evaluates the validation "
            "batches; give a count >= 1 or a fraction in (0, 1]"
        )
    warmup = run.lr_scheduler.schedule().get("warmup_t")  # cosine_decay_warmup
    if warmup is not None and warmup >= trainer.max_steps:
        raise UserError(
            f"lr_scheduler.warmup_t={warmup} leaves no steps for the cosine decay "
            f"(trainer.max_steps={trainer.max_steps}); choose warmup_t < max_steps"
        )


def check_callbacks(run: RunSettings) -> None:
    """Each `callbacks` node builds (its class checks its own arguments); nothing is written."""
    import hydra

    for name, node in run.callbacks.items():
        try:
            hydra.utils.instantiate(node)
        except Exception as err:  # the class's own error, wrapped by Hydra
            reason = str(err.__cause__ or err).strip().splitlines()[0]
            raise UserError(f"callbacks.{name}: {reason}") from None


def check_backend(run: RunSettings, hw: Hardware, objective) -> None:
    """The attention backend on this machine, for this objective's masks."""
    backend = run.model.attn_backend
    if backend == "flex":
        if not flex_available():
            raise UserError("model.attn_backend=flex needs torch.nn.attention.flex_attention")
        if run.mode == "train" and hw.accelerator == "cpu":
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
        if objective.capabilities.two_stream:
            raise UserError(
                f"model.attn_backend=flash_attn cannot express the block-diffusion masks of "
                f"algo={run.algo.name}; use sdpa or flex"
            )


def check_strategy(run: RunSettings, hw: Hardware) -> None:
    """strategy=fsdp needs CUDA, clips by norm only (through FSDP's own clip_grad_norm_, see
    Diffusion.configure_gradient_clipping) and has no EMA: ours keeps full copies of the
    parameters by name, which is not shard-aware."""
    if run.strategy.name != "fsdp":
        return
    if hw.accelerator != "gpu":
        raise UserError("strategy=fsdp needs CUDA GPUs (Lightning has no FSDP on CPU); use ddp")
    if run.training.ema > 0:
        raise UserError(
            f"strategy=fsdp with training.ema={run.training.ema}: the EMA is not shard-aware "
            "(it keeps full parameter copies); set training.ema=0 or use strategy=ddp"
        )
    if run.training.compile:
        raise UserError(
            "strategy=fsdp with training.compile=true: the compiled blocks would bypass the FSDP "
            "units; set training.compile=false or use strategy=ddp"
        )
    algorithm = run.trainer.gradient_clip_algorithm
    if algorithm not in (None, "norm"):
        raise UserError(
            f"strategy=fsdp with trainer.gradient_clip_algorithm={algorithm}: FSDP clips by "
            "norm only; set trainer.gradient_clip_algorithm=norm"
        )
