"""Every key a user can set, with its type and range: `check_schema(cfg)` walks the composed
config and fails on the first unknown key or bad value with one line naming the key and what
would be valid. Cross-key rules (capabilities of the objective, backends, strategies, paths)
are in settings/checks.py.

A group whose meaning depends on its choice (`strategy`, `lr_scheduler`) has one table per
choice. `trainer` also takes any other keyword of `lightning.Trainer`, `wandb` any keyword of
Lightning's WandbLogger or `wandb.init`; `callbacks` nodes are checked by instantiating them
(settings.checks.check_callbacks). Every number, in the tables or not, is finite.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

from models.attention import BACKENDS
from noise_schedule import SCHEDULES
from registry import OBJECTIVES
from sampling.config import UNMASK_ORDERS
from utils import UserError

PRECISION_NAMES = (
    "auto", "32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true",
    "64-true", "64",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Spec:
    """One key: `kind` int | real | bool | text | choice | reals | batches | any; bounds for
    numbers (`lo_open` / `hi_open`: strict); `choices` for choice; `null`: None allowed; `extra`:
    literal values also allowed (e.g. "auto"). Numbers are finite (NaN and inf never pass).
    `batches` is Lightning's batch count or epoch fraction: an integer >= lo, or a fraction of
    an epoch, a float in [0, 1] ((0, 1] when lo > 0: a zero fraction is as empty as 0)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    null: bool = False
    extra: tuple = ()

    def problem(self, value: Any) -> str | None:
        """None when `value` is valid, else what would be valid."""
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        if any(type(value) is type(e) and value == e for e in self.extra):
            return None
        if self.kind == "any":
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "text":
            return None if isinstance(value, str) and value else "must be a non-empty string"
        if self.kind == "choice":
            return None if str(value) in self.choices else f"valid are {', '.join(self.choices)}"
        if self.kind == "reals":
            if not isinstance(value, (list, tuple)):
                return f"must be a list of {self.describe()}"
            bad = [v for v in value if not self._in_range(v, real=True)]
            return f"entries must be {self.describe()}" if bad else None
        if self.kind == "batches" and isinstance(value, float):
            fraction = Spec("real", 0, 1, lo_open=bool(self.lo))
            return None if fraction.problem(value) is None else f"must be {self.describe()}"
        return (
            None
            if self._in_range(value, real=self.kind == "real")
            else f"must be {self.describe()}"
        )

    def _in_range(self, value: Any, real: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if real else int):
            return False
        if real and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        if self.kind in ("bool", "text", "choice"):
            text = {"bool": "true or false", "text": "a non-empty string"}.get(
                self.kind, f"one of {', '.join(self.choices)}"
            )
        elif self.kind == "batches":
            zero = "(0, 1]" if self.lo else "[0, 1]"
            text = f"an integer >= {_num(self.lo)} or a fraction of an epoch in {zero}"
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
            if self.hi is not None:
                bounds.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        alternatives = [repr(e) if isinstance(e, str) else str(e) for e in self.extra]
        alternatives += ["null"] if self.null else []
        return text + "".join(f" or {a}" for a in alternatives)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def Int(lo=None, hi=None, **kw) -> Spec:  # noqa: N802 (spec constructors read as types)
    return Spec("int", lo, hi, **kw)


def Real(lo=None, hi=None, **kw) -> Spec:  # noqa: N802
    return Spec("real", lo, hi, **kw)


def Choice(*choices: str, **kw) -> Spec:  # noqa: N802
    return Spec("choice", choices=choices, **kw)


BOOL, TEXT = Spec("bool"), Spec("text")
TEXT_OR_NULL = Spec("text", null=True)
POSITIVE, POSITIVE_OR_NULL = Int(1), Int(1, null=True)
POSITIVE_OR_NULL_OR_UNLIMITED = Int(1, null=True, extra=(-1,))  # Lightning's -1: no limit

TOP = {
    "mode": Choice("train", "ppl_eval", "sample_eval"),
    "seed": Int(0, 2**32 - 1),  # Lightning's seed_everything takes numpy's range (else 0)
    "block_size": POSITIVE,
    "verbose": BOOL,  # console: the resolved config and the model summary
}

GROUPS: dict[str, dict[str, Spec]] = {
    "loader": {
        "global_batch_size": POSITIVE,
        "eval_global_batch_size": POSITIVE,
        "batch_size": POSITIVE_OR_NULL,
        "eval_batch_size": POSITIVE_OR_NULL,
        "num_workers": Int(0, null=True),
        "pin_memory": BOOL,
    },
    "sampling": {  # the sampler's options (sampling.SamplerConfig checks the same ranges)
        "num_sample_batches": POSITIVE,
        "var_length": BOOL,
        "reject_low_entropy": BOOL,
        "logdir": TEXT_OR_NULL,
        "nucleus_p": Real(0, 1, lo_open=True),  # (0, 1]
        "first_hitting": BOOL,
        "kv_cache": BOOL,
        "reencode_context": BOOL,
        "prefix": Spec("any", null=True),
        "prefix_file": TEXT_OR_NULL,
        "fuse_commit": BOOL,
        "tokens_per_step": POSITIVE,
        "confidence_threshold": Real(0, 1, lo_open=True, null=True),
        "entropy_bound": Real(0, lo_open=True, null=True),
        "eb_gamma": Real(0, null=True),
        "unmask_order": Choice(*UNMASK_ORDERS),
    },
    "training": {
        "ema": Real(0, 1, hi_open=True),
        "antithetic_sampling": BOOL,
        "resample": BOOL,
        "sampling_eps_min": Real(0, 1, lo_open=True),
        "sampling_eps_max": Real(0, 1, lo_open=True),
        "from_pretrained": TEXT_OR_NULL,
        "eval_nll": BOOL,
        "compile": BOOL,
    },
    "eval": {
        "checkpoint_path": TEXT,
        "disable_ema": BOOL,
        "gen_ppl_eval_model_name_or_path": TEXT_OR_NULL,
        "sanity_ppl_max": Real(1, null=True),
        "mc_samples": POSITIVE,  # ppl_eval: NELBO draws averaged per row (docs/error_bars.md)
    },
    "optim": {
        "weight_decay": Real(0),
        "lr": Real(0, lo_open=True),
        "beta1": Real(0, 1, hi_open=True),
        "beta2": Real(0, 1, hi_open=True),
        "eps": Real(0, lo_open=True),
    },
    "trainer": {
        "accelerator": Choice("auto", "cpu", "gpu", "cuda"),
        "num_nodes": POSITIVE,
        "devices": Int(1, extra=("auto",)),
        "accumulate_grad_batches": POSITIVE_OR_NULL,
        "gradient_clip_val": Real(0, null=True),
        "gradient_clip_algorithm": Choice("norm", "value", null=True),
        "precision": Choice(*PRECISION_NAMES),
        "num_sanity_val_steps": Int(-1),
        "max_steps": POSITIVE,
        "log_every_n_steps": POSITIVE,
        "limit_train_batches": Spec("batches", 1),  # 0 would train on nothing
        "limit_val_batches": Spec("batches", 0),  # 0: no validation
        "val_check_interval": Spec("batches", 1),
        "check_val_every_n_epoch": POSITIVE_OR_NULL,
        "deterministic": Spec("bool", null=True, extra=("warn",)),
        "float32_matmul_precision": Choice("highest", "high", "medium"),
        "enable_progress_bar": BOOL,
        "enable_model_summary": BOOL,
        "max_epochs": POSITIVE_OR_NULL_OR_UNLIMITED,  # 0 would train nothing
    },
    "checkpointing": {
        "save_dir": TEXT,
        "resume_from_ckpt": BOOL,
        "resume_ckpt_path": TEXT,
        "keep_last_k": POSITIVE_OR_NULL,
    },
    "algo": {
        "name": Choice(*OBJECTIVES),
        # hf_dit: evaluating a released HF checkpoint (float32 unless trainer.precision says)
        "backbone": Choice("dit", "hf_dit", null=True),
        "parameterization": Choice(*dict.fromkeys(s.parameterization for s in OBJECTIVES.values())),
        "time_conditioning": BOOL,
        "T": Int(0),
        "ignore_bos": BOOL,
        "cross_attn": BOOL,
        "var_min": BOOL,
        "clip_search_delta": Real(0, 1, lo_open=True),
        "clip_search_widths": Spec("reals", 0, 1, lo_open=True),
        "clip_search_batches": POSITIVE,
        "fix_clipping": BOOL,
        "mdlm_loss_scale": BOOL,
        # SSD-LM only (configs/algo/ssdlm.yaml, docs/ssdlm.md)
        "diffusion_steps": POSITIVE_OR_NULL,  # T of the training forward process (5000)
        "simplex_value": Real(0, lo_open=True, null=True),  # k of the +-k simplex (5)
        "top_p": Real(0, 1, lo_open=True, null=True),  # the sampling projection's top-p (0.95)
        "context": Choice("previous_block", "all", null=True),  # the sampler's context
        "max_context": POSITIVE_OR_NULL,  # at most this many context tokens (train and sample)
    },
    "model": {
        "name": TEXT,
        "backbone": Choice("dit", "roberta"),
        "hidden_size": POSITIVE,
        "cond_dim": POSITIVE,
        "length": POSITIVE,
        "n_blocks": POSITIVE,
        "n_heads": POSITIVE,
        "dropout": Real(0, 1, hi_open=True),
        "adaln": BOOL,
        "attn_backend": Choice(*BACKENDS),
    },
    "noise": {"type": Choice(*SCHEDULES)},
    "data": {
        "train": TEXT,
        "valid": TEXT,
        "tokenizer_name_or_path": TEXT,
        "cache_dir": TEXT,
        "wrap": BOOL,
        "streaming": BOOL,
        "source": TEXT_OR_NULL,
        "valid_source": TEXT_OR_NULL,
        "num_proc": POSITIVE_OR_NULL,
        "held_out_docs": POSITIVE_OR_NULL,
        "held_out_chars": POSITIVE_OR_NULL,
        "num_valid_docs": POSITIVE,
        "text_column": TEXT,
        "train_split": TEXT,
        "valid_split": TEXT,
        "insert_train_eos": BOOL,
        "insert_valid_eos": BOOL,
        "insert_train_special": BOOL,
        "insert_valid_special": BOOL,
    },
}

BY_CHOICE: dict[str, dict[str, dict[str, Spec]]] = {
    "strategy": {
        "ddp": {"name": TEXT, "find_unused_parameters": BOOL, "force": BOOL},
        "fsdp": {
            "name": TEXT,
            "sharding_strategy": Choice("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"),
        },
    },
    "lr_scheduler": {
        "constant": {"name": TEXT},
        "constant_warmup": {"name": TEXT, "num_warmup_steps": Int(0)},
        "cosine_decay_warmup": {
            "name": TEXT,
            "warmup_t": Int(0, null=True),
            "warmup_lr_init": Real(0),
            "lr_min": Real(0),
        },
    },
}

# Trainer keywords the run sets itself (from other keys, or its own objects)
TRAINER_OWNED = (
    "strategy",
    "callbacks",
    "logger",
    "plugins",
    "default_root_dir",
    "enable_checkpointing",
)
WANDB_KEYS = (
    "project", "name", "id", "notes", "group", "job_type", "tags", "entity", "offline", "mode",
    "anonymous", "log_model", "prefix", "checkpoint_name", "version", "dir", "resume", "reinit",
    "settings", "save_code", "allow_val_change", "monitor_gym", "sync_tensorboard", "fork_from",
    "resume_from", "config_exclude_keys", "config_include_keys", "force", "magic",
    "add_file_policy",
)  # fmt: skip
PLAIN = (*TOP, "callbacks", "wandb", "strategy", "lr_scheduler", *GROUPS)


def check_schema(cfg: Mapping[str, Any]) -> None:
    """Raise UserError on the first unknown key or bad value of the resolved config `cfg` (a
    plain dict, `hydra` removed)."""
    _known(cfg, "", PLAIN)
    for key, spec in TOP.items():
        _check(key, cfg.get(key), spec)
    for group, table in GROUPS.items():
        _check_group(
            group, cfg.get(group), table, extra=_trainer_keys() if group == "trainer" else ()
        )
    for group, tables in BY_CHOICE.items():
        node = cfg.get(group) or {}
        name = node.get("name")
        if name not in tables:
            raise UserError(f"{group}={name}: valid are {', '.join(tables)}")
        _check_group(group, node, tables[name])
    wandb = cfg.get("wandb")
    if wandb is not None:
        if not isinstance(wandb, Mapping):
            raise UserError(f"wandb={wandb!r}: give null or keys of the wandb group")
        _known(wandb, "wandb.", WANDB_KEYS)
    callbacks = cfg.get("callbacks") or {}
    for name, node in callbacks.items():
        if not isinstance(node, Mapping) or "_target_" not in node:
            raise UserError(f"callbacks.{name}: needs a _target_ (a callback class to build)")
    _check_finite(cfg, "")


def _check_finite(node: Any, key: str) -> None:
    """Numbers the tables do not cover (Lightning's other Trainer keywords, callback and wandb
    options) are finite too."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            _check_finite(value, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise UserError(f"{key}={node}: must be a finite number")


def _check_group(group: str, node: Any, table: dict[str, Spec], extra: tuple = ()) -> None:
    if not isinstance(node, Mapping):
        raise UserError(f"{group}={node!r}: the {group} group must be a mapping of keys")
    _known(node, f"{group}.", (*table, *extra))
    for key, spec in table.items():
        if key in node:
            _check(f"{group}.{key}", node[key], spec)
        elif not spec.null and group not in ("trainer", "data") and spec.kind != "any":
            raise UserError(f"{group}.{key} is missing; it must be {spec.describe()}")


def _check(key: str, value: Any, spec: Spec) -> None:
    problem = spec.problem(value)
    if problem is not None:
        raise UserError(f"{key}={value!r}: {problem}")


def _known(node: Mapping[str, Any], prefix: str, valid) -> None:
    for key in node:
        if key in valid:
            continue
        close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        if prefix == "trainer.":
            listing = "the keywords of lightning.Trainer, except those the run sets: "
            listing += ", ".join(TRAINER_OWNED)
        else:
            listing = ", ".join(map(str, valid))
        raise UserError(f"{prefix}{key} is not a known key ({hint}valid: {listing})")


def _trainer_keys() -> tuple[str, ...]:
    """The other keywords of lightning.Trainer a user may pass through `trainer.*`."""
    import inspect

    import lightning as L

    names = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    return tuple(sorted(names - set(TRAINER_OWNED) - set(GROUPS["trainer"])))
