"""What a resumed run may change: `check_resume_config` compares the run's resolved config with
the one its checkpoint was trained with."""

from __future__ import annotations

from collections.abc import Mapping

from settings.paths import yaml_value
from utils import UserError

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
        f"{key} {yaml_value(old[key])} -> {yaml_value(value)}"
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
