"""Rules across keys, checked once before anything is written: what the objective can do
(its KV cache, prompts, sampler and block structure are properties of the objective built
from the config), attention backends, the strategy, and paths that runs will write.

Each check raises UserError with one line naming the key and what would be valid.
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile
from collections.abc import Collection, Mapping

from omegaconf import DictConfig, OmegaConf

import registry
from algorithms.base import (
    DEFAULT_EPS_MAX,
    DEFAULT_EPS_MIN,
    SAMPLER_OPTIONS,
    check_resample_interval,
    f32_equal,
)
from algorithms.clip_search import interval_grid
from models import dit_config
from models.attention import flash_available, flex_available
from noise_schedule import build_noise
from sampling import SamplerConfig, sampler_config
from settings.hardware import Hardware
from utils import UserError, filesystem, get_logger

log = get_logger("bd3lms")


def settle_block_size(
    cfg: DictConfig, context: int, context_name: str, command_line: Collection[str] = ()
) -> None:
    """Set `block_size` to the K the run uses, so that config_resolved.yaml and checkpoints
    record it: an objective that fixes K (its registry entry's `block_size`: AR 1, MDLM and
    SEDD the context) takes its own, with a log line when the composed config said otherwise
    (an experiment's K for BD3-LM); UserError when the command line (`command_line`: the keys
    it sets) asked for another K, or when a block is longer than the context (`context`
    tokens, `context_name` in messages)."""
    spec = objective_spec(cfg)
    given = int(cfg.block_size)
    K = registry.block_size_of(cfg.algo, context, given=-1)
    if K == -1:  # K is the objective's own parameter
        if given > context:
            raise UserError(
                f"block_size={given} exceeds {context_name} ({context} tokens): a block is at "
                "most the context; give a block size that divides it"
            )
        return
    if given == K:
        return
    equation = "K = 1" if K == 1 else f"K = {context_name} = {K}"
    why = f"algo={spec.name} {spec.fixed_k_reason} ({equation})"
    if "block_size" in command_line:
        raise UserError(f"block_size={given}: {why}; leave block_size out or set it to {K}")
    log.info("block_size %d of the config -> %d: %s", given, K, why)
    cfg.block_size = K


def objective_spec(cfg: DictConfig) -> registry.ObjectiveSpec:
    """The registry entry of `algo=` (the schema checked the name)."""
    return registry.objective_spec(str(cfg.algo.name))


def build_objective(cfg: DictConfig, seq_len: int, mask_id: int = 0, crop=None):
    """The objective of `cfg` for a context of `seq_len` tokens, built by its registry entry.
    `block_size` reaches it here and nowhere else: an objective that fixes K takes its own
    (whatever `block_size` says: `settle_block_size` records it), BD3-LM and SSD-LM
    `block_size`."""
    try:
        noise = build_noise(cfg.noise.type)
        return registry.build_objective(
            cfg.algo, cfg.training, noise, mask_id, seq_len, int(cfg.block_size), crop
        )
    except ValueError as err:
        raise UserError(str(err)) from None


def check_run(cfg: DictConfig, hw: Hardware) -> None:
    """Every cross-key rule of `cfg` that does not need a checkpoint."""
    # sample_eval: model.length is the generation length, checked against the trained window
    # once the checkpoint is read (check_sampling); the capabilities do not depend on it.
    seq_len = int(cfg.block_size) if cfg.mode == "sample_eval" else int(cfg.model.length)
    objective, spec = build_objective(cfg, seq_len), objective_spec(cfg)
    try:
        dit_config(cfg.model, vocab_size=1, causal=spec.causal)
    except ValueError as err:
        raise UserError(str(err)) from None
    check_network(cfg, spec, objective)
    check_backend(cfg, hw, objective)
    training = cfg.training
    if float(training.sampling_eps_min) > float(training.sampling_eps_max):
        raise UserError(
            f"training.sampling_eps_min={training.sampling_eps_min} exceeds "
            f"training.sampling_eps_max={training.sampling_eps_max}"
        )
    if cfg.algo.clip_search_widths and not cfg.algo.var_min:
        raise UserError("algo.clip_search_widths needs algo.var_min=true (algo=bd3lm)")
    if cfg.mode != "sample_eval":  # training and validation draw t from these intervals
        check_clip_intervals(cfg, objective)
    check_strategy(cfg, hw)
    check_trainer(cfg)
    check_creatable("data.cache_dir", str(cfg.data.cache_dir))
    if cfg.mode == "train":
        check_writable("checkpointing.save_dir", str(cfg.checkpointing.save_dir))
        resume = cfg.checkpointing.resume_ckpt_path
        if cfg.checkpointing.resume_from_ckpt and resume is not None and "://" in str(resume):
            filesystem(str(resume), "checkpointing.resume_ckpt_path")  # its backend installed
        check_callbacks(cfg)
        if cfg.wandb is not None:
            check_wandb_credentials(cfg.wandb)
    if cfg.mode == "sample_eval":
        check_sampling_keys(cfg, objective)


def check_clip_intervals(cfg: DictConfig, objective) -> None:
    """The intervals [eps_min, eps_max] t is drawn from: with algo.var_min, the configured
    one (the clip buffers' start) and every interval of the clip search's grid (each measured
    at validation, and the chosen one trained on: algorithms.clip_search.interval_grid, used
    when it holds more than one). Without, every objective trains on [1e-3, 1], so the keys
    of the interval are refused when set. A grid interval must end by t = 1. With
    training.resample, q_xt redraws a block of K tokens until its masked fraction, a multiple
    of 1/K, lies in the interval, and refuses an interval that holds none
    (algorithms.base.check_resample_interval): at step 0 for the configured interval, at the
    first validation for the grid's."""
    training, algo = cfg.training, cfg.algo
    eps_min, eps_max = float(training.sampling_eps_min), float(training.sampling_eps_max)
    default = f32_equal(eps_min, DEFAULT_EPS_MIN) and f32_equal(eps_max, DEFAULT_EPS_MAX)
    if not (algo.var_min and objective.capabilities.clip_interval):  # no learned interval
        which = f"algo={algo.name} with algo.var_min={_yaml(algo.var_min)}"
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
    K = objective.block_size
    grid = interval_grid(list(algo.clip_search_widths), float(algo.clip_search_delta), K)
    for low, high in grid if len(grid) > 1 else []:
        if high > 1:
            raise UserError(
                f"algo.clip_search_delta={algo.clip_search_delta}: the clip search's grid "
                f"reaches the interval [{low:.4g}, {high:.4g}] (width {high - low:.4g}), beyond "
                "t = 1; choose a delta that divides 1 - width for every width (the paper: 0.05)"
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
                f"algo.clip_search_widths={list(algo.clip_search_widths)}: the clip search's "
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


def check_trainer(cfg: DictConfig) -> None:
    """Trainer and schedule keys that only make sense together."""
    trainer, schedule = cfg.trainer, cfg.lr_scheduler
    interval = trainer.get("val_check_interval")
    if isinstance(interval, float) and trainer.get("check_val_every_n_epoch") is None:
        raise UserError(
            f"trainer.val_check_interval={interval}: a fraction of an epoch needs "
            "trainer.check_val_every_n_epoch (without, validation counts micro-batches across "
            "epochs); give an integer"
        )
    limit = trainer.get("limit_val_batches")
    if cfg.mode == "ppl_eval" and limit == 0:
        raise UserError(
            f"trainer.limit_val_batches={limit}: mode=ppl_eval evaluates the validation "
            "batches; give a count >= 1 or a fraction in (0, 1]"
        )
    warmup = schedule.get("warmup_t")  # cosine_decay_warmup
    if warmup is not None and warmup >= trainer.max_steps:
        raise UserError(
            f"lr_scheduler.warmup_t={warmup} leaves no steps for the cosine decay "
            f"(trainer.max_steps={trainer.max_steps}); choose warmup_t < max_steps"
        )


def check_callbacks(cfg: DictConfig) -> None:
    """Each `callbacks` node builds (its class checks its own arguments); nothing is written."""
    import hydra

    for name, node in cfg.callbacks.items():
        try:
            hydra.utils.instantiate(node)
        except Exception as err:  # the class's own error, wrapped by Hydra
            reason = str(err.__cause__ or err).strip().splitlines()[0]
            raise UserError(f"callbacks.{name}: {reason}") from None


def check_network(cfg: DictConfig, spec: registry.ObjectiveSpec, objective) -> None:
    """The network the objective runs on (its entry's `backbones`), what its training rows
    need (`objective.check_rows`), whether it has a likelihood bound for ppl_eval
    (capabilities.ppl_eval) and its entry's own rules (`spec.check`)."""
    name, backbone = cfg.algo.name, cfg.model.backbone
    if cfg.algo.parameterization != spec.parameterization:  # what checkpoints record
        raise UserError(
            f"algo.parameterization={cfg.algo.parameterization}: algo={name} is "
            f"algo.parameterization={spec.parameterization}"
        )
    if backbone not in spec.backbones:
        raise UserError(
            f"model.backbone={backbone}: algo={name} runs on model.backbone="
            f"{' or '.join(spec.backbones)}"
        )
    if cfg.mode == "ppl_eval" and not objective.capabilities.ppl_eval:
        raise UserError(
            f"mode=ppl_eval: algo={name} has no likelihood bound to evaluate; use "
            "mode=sample_eval (generative perplexity)"
        )
    if cfg.mode == "train":
        try:
            objective.check_rows(int(cfg.model.length))
        except ValueError as err:
            raise UserError(str(err)) from None
    if spec.check is not None:
        spec.check(cfg, objective)


def check_backend(cfg: DictConfig, hw: Hardware, objective) -> None:
    backend = cfg.model.attn_backend
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
        if objective.capabilities.two_stream:
            raise UserError(
                f"model.attn_backend=flash_attn cannot express the block-diffusion masks of "
                f"algo={cfg.algo.name}; use sdpa or flex"
            )


def check_strategy(cfg: DictConfig, hw: Hardware) -> None:
    """strategy=fsdp needs CUDA, clips by norm only (through FSDP's own clip_grad_norm_, see
    Diffusion.configure_gradient_clipping) and has no EMA: ours keeps full copies of the
    parameters by name, which is not shard-aware."""
    if cfg.strategy.name != "fsdp":
        return
    if hw.accelerator != "gpu":
        raise UserError("strategy=fsdp needs CUDA GPUs (Lightning has no FSDP on CPU); use ddp")
    if float(cfg.training.ema) > 0:
        raise UserError(
            f"strategy=fsdp with training.ema={cfg.training.ema}: the EMA is not shard-aware "
            "(it keeps full parameter copies); set training.ema=0 or use strategy=ddp"
        )
    if cfg.training.compile:
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
        fuse_commit=bool(sampling.fuse_commit),
        tokens_per_step=int(sampling.tokens_per_step),
        confidence_threshold=sampling.confidence_threshold,
        entropy_bound=sampling.entropy_bound,
        eb_gamma=sampling.eb_gamma,
        unmask_order=str(sampling.unmask_order),
    )


def check_sampling_keys(cfg: DictConfig, objective) -> None:
    """sample_eval's keys: the sampler's options (their ranges are SamplerConfig's), what the
    objective can do, prompts and the output directory."""
    sampling = cfg.sampling
    check_unread_sampling_keys(cfg, objective)
    try:
        SamplerConfig(
            length=1,
            block_size=1,
            context=1,
            bos_id=0,
            mask_id=0,
            eos_id=0,
            **sampling_options(cfg),
        )  # fmt: skip  (a trivial geometry: the options alone)
    except ValueError as err:
        raise UserError(str(err)) from None
    length = int(cfg.model.length)
    if objective.capabilities.two_stream and length % objective.block_size:  # no checkpoint needed
        raise UserError(
            f"block_size={objective.block_size} must divide the generation length "
            f"model.length={length}"
        )
    if sampling.kv_cache and not objective.capabilities.kv_cache:
        which = f"algo={cfg.algo.name}"
        if objective.capabilities.time_conditioned:
            which += f" with algo.time_conditioning={_yaml(cfg.algo.time_conditioning)}"
        raise UserError(
            f"sampling.kv_cache=true: {which} recomputes its context at every step (only bd3lm "
            "without time conditioning and ar keep clean keys); set sampling.kv_cache=false"
        )
    if sampling.kv_cache and sampling.reencode_context:
        raise UserError(
            "sampling.reencode_context=true is the uncached variant; set kv_cache=false"
        )
    if sampling.prefix is not None and sampling.prefix_file is not None:
        raise UserError("give sampling.prefix or sampling.prefix_file, not both")
    has_prompt = sampling.prefix is not None or sampling.prefix_file is not None
    if has_prompt and not objective.capabilities.prompts:
        raise UserError(
            f"sampling.prefix: algo={cfg.algo.name} samples without a prompt; prompts need "
            "algo=bd3lm or ar"
        )
    if sampling.prefix_file is not None and not os.path.isfile(sampling.prefix_file):
        raise UserError(f"sampling.prefix_file={sampling.prefix_file}: no such file")
    if sampling.logdir is not None:
        if "://" in str(sampling.logdir):  # samples are appended to local files as they come
            raise UserError(
                f"sampling.logdir={sampling.logdir}: a local directory is needed (samples are "
                "appended as they are drawn); copy the directory to the URL afterwards"
            )
        check_writable("sampling.logdir", str(sampling.logdir))
    judge = cfg.eval.gen_ppl_eval_model_name_or_path  # a local path; a hub id is probed at load
    local = judge is not None and str(judge).startswith(("/", ".", "~"))
    if local and not os.path.isdir(os.path.expanduser(str(judge))):
        raise UserError(
            f"eval.gen_ppl_eval_model_name_or_path={judge}: no such directory; give a local "
            "causal LM directory, a hub id, or null to skip generative perplexity"
        )


CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@functools.cache
def sampling_defaults(algo: str) -> dict:
    """The `sampling` group as configs/ sets it for `algo=NAME`, before any experiment or
    override: configs/config.yaml's, under the keys a global-package algo file sets itself
    (configs/algo/ssdlm.yaml: sampling.first_hitting=false)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIGS / "config.yaml").sampling)
    path = CONFIGS / "algo" / f"{algo}.yaml"
    if path.is_file():  # an algo-package file has no `sampling` (algo.sampling is no key)
        defaults.update(OmegaConf.to_container(OmegaConf.load(path)).get("sampling") or {})
    return defaults


def check_unread_sampling_keys(cfg: DictConfig, objective) -> None:
    """The sampler options (algorithms.base.SAMPLER_OPTIONS) that the objective's sampler does
    not read (`objective.sampling_keys`), refused when set away from their defaults
    (`sampling_defaults`)."""
    keys, name = objective.capabilities.sampling_keys, cfg.algo.name
    defaults = sampling_defaults(str(name))
    for key in SAMPLER_OPTIONS:
        value, default = cfg.sampling.get(key, defaults[key]), defaults[key]
        if key in keys.reads or value == default:
            continue
        reads = ", ".join(f"sampling.{k}" for k in SAMPLER_OPTIONS if k in keys.reads)
        instead = dict(keys.instead).get(key)
        leave = f"set {instead} instead and leave" if instead else "leave"
        raise UserError(
            f"sampling.{key}={_yaml(value)}: algo={name} has no use for it (its sampler reads "
            f"{reads or 'no other option'}); {leave} sampling.{key}={_yaml(default)}"
        )


def _yaml(value) -> str:
    """A value as it is written on the command line (true, null, 0.5)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_sampling(cfg: DictConfig, window: int, command_line: Collection[str] = ()) -> None:
    """The sampler of `cfg` for a checkpoint trained on `window` tokens: `block_size` settled
    for that window (`settle_block_size`; `command_line`: the keys the command line sets), the
    generation length against the objective's blocks (SamplerConfig's rules)."""
    settle_block_size(cfg, window, "the checkpoint's trained window", command_line)
    objective = build_objective(cfg, window)
    try:
        sampler_config(objective, window, int(cfg.model.length), None, sampling_options(cfg))
    except ValueError as err:
        raise UserError(str(err)) from None


# Keys a resumed run may change: how it executes, logs, checkpoints, validates and samples, and
# how long it trains. They act from the resumed step on and shaped nothing already trained.
RESUME_MAY_CHANGE = (
    "mode", "verbose", "trainer", "loader", "strategy", "checkpointing", "callbacks", "wandb",
    "eval", "sampling", "model.attn_backend", "algo.T", "data.cache_dir", "data.num_proc",
    "training.compile", "training.eval_nll",
)  # fmt: skip
# ... except these, which define the optimisation the checkpoint is part of
RESUME_FIXED = (
    "loader.global_batch_size", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm",
    "trainer.limit_train_batches",
)  # fmt: skip


def check_resume_config(stored: Mapping, run: Mapping, where: str) -> None:
    """A resumed run (`run`, its resolved config as a plain dict) against the config its
    checkpoint was trained with (`stored`): one UserError line, starting with `where`, listing
    every changed key that cannot change mid-run (old -> new). Those are all keys but
    RESUME_MAY_CHANGE: the model, objective, noise, data, seed and block size, and the optimiser
    and schedule, whose state (the learning rate included) the resume restores from the
    checkpoint, so that a new value would be recorded but not used. trainer.max_steps is fixed
    too under lr_scheduler=cosine_decay_warmup, whose decay spans it. Keys missing on either
    side (older checkpoints, added keywords) are not compared."""
    old, new = _flatten(stored), _flatten(run)
    if "block_size" in old:
        old["block_size"] = _block_size_used(stored)
    fixed = RESUME_FIXED
    if (run.get("lr_scheduler") or {}).get("name") == "cosine_decay_warmup":
        fixed += ("trainer.max_steps",)
    changed = [
        f"{key} {_yaml(old[key])} -> {_yaml(value)}"
        for key, value in new.items()
        if key in old
        and old[key] != value
        and (_under(key, fixed) or not _under(key, RESUME_MAY_CHANGE))
    ]
    if changed:
        raise UserError(
            f"{where}: the run changes keys that cannot change on resume: {', '.join(changed)}; "
            "set them back, or train in a new run directory (training.from_pretrained starts "
            "one from this checkpoint's weights)"
        )


def _block_size_used(config: Mapping):
    """The K that the run of a stored `config` trained with, also when it was written before
    runs recorded the K that an objective fixes: AR 1, SEDD the length, MDLM the block size
    clipped to the length (as build_objective then did), BD3-LM and SSD-LM the block size."""
    algo, K = config.get("algo") or {}, config["block_size"]
    length = (config.get("model") or {}).get("length")
    if algo.get("parameterization") == "ar":
        return 1
    if length is None:
        return K
    if algo.get("parameterization") == "sedd":
        return length
    if algo.get("parameterization") == "subs" and not algo.get("cross_attn"):
        return min(K, length)
    return K


def _flatten(node: Mapping, prefix: str = "") -> dict:
    """{dotted key: value} of a nested mapping's leaves (lists are leaves)."""
    out = {}
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_writable(key: str, path: str) -> None:
    """`path` is a directory this process can write in, or can be created as one (fsspec
    URLs are not probed): a probe directory is made and removed in `path` or its nearest
    existing parent (permission bits do not tell: root may create nothing under /proc)."""
    if "://" in path:
        filesystem(path, key)  # an fsspec backend serves it; nothing written or listed
        return
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    why = f"{existing} is not a directory"
    if os.path.isdir(existing):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".bd3lms-probe-", dir=existing))
            return
        except OSError as err:
            why = f"nothing can be created in {existing}: {err.strerror}"
    raise UserError(f"{key}={path} cannot be written ({why}); give a writable directory")


def check_creatable(key: str, path: str) -> None:
    """`path` is a directory, or can be created as one (check_writable). An existing directory
    is not probed: reading what it holds needs no write (the data cache builds what is missing
    and says so then, data.cache.load_or_build)."""
    if "://" in path or os.path.isdir(os.path.expanduser(path)):
        return
    check_writable(key, path)


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
