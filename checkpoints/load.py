"""One entry point for every checkpoint source: `eval.checkpoint_path` and
`training.from_pretrained` both go through `read_any_checkpoint` (no module needed, so a bad path
fails before anything is written) and `load_checkpoint_into` (config comparison, then strict
loading by name).

Sources: our Lightning `.ckpt` (`checkpoints.ours`), HF directories and hub ids (the released
checkpoints; `checkpoints.layout`), the reference's pickled `.ckpt` (`checkpoints.reference`).
Evaluation first checks the checkpoint's objective family against the run's
(`checkpoints.family`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from checkpoints.family import check_family
from checkpoints.layout import (
    CLIP_BUFFERS,
    INV_FREQ,
    CheckpointError,
    LoadedCheckpoint,
    adapt_backbone_state,
    detect_kind,
    infer_dit_shape,
    is_hub_id,
    read_hf_directory,
    resolve_pretrained,
    split_backbone,
)
from checkpoints.ours import (
    clip_buffers,
    load_pretrained,
    load_weights,
    read_checkpoint,
    with_clip_buffers,
)
from checkpoints.reference import is_reference_format, read_reference
from checkpoints.unpickle import restricted_load
from models.dit import DiTConfig
from utils import UserError, get_logger

if TYPE_CHECKING:
    from diffusion import Diffusion

log = get_logger("bd3lms")


def read_any_checkpoint(path: str, key: str, n_heads: int | None = None) -> LoadedCheckpoint:
    """Read `path` (hub id, HF directory, our .ckpt or the reference's .ckpt) without building
    a module, so that a bad path fails before anything is written. n_heads: the run's
    model.n_heads, used only where the file does not say (it cannot be read from shapes)."""
    try:
        if os.path.isdir(path) or is_hub_id(path):
            directory = resolve_pretrained(path)
            return read_hf(directory, path, n_heads)
        if not os.path.isfile(path):
            raise UserError(
                f"{key}={path}: no such file or directory; give a Lightning .ckpt, an HF "
                "directory (config.json + model.safetensors) or a hub id org/name"
            )
        try:
            raw = read_checkpoint(path, key)
        except UserError:
            raw = None  # not loadable with weights_only: maybe the reference's pickled format
        if raw is not None:
            if is_reference_format(raw):
                return read_reference(raw, path, n_heads)
            return LoadedCheckpoint(source=path, format="ours", raw=raw)
        try:
            raw = restricted_load(path)
        except Exception as err:  # noqa: BLE001 - any failure means a bad file for the user
            raise UserError(
                f"{key}={path} is not a readable checkpoint ({type(err).__name__})"
            ) from None
        return read_reference(raw, path, n_heads)
    except CheckpointError as err:
        raise UserError(f"{key}={path}: {err}") from None


def read_hf(directory: str, source: str, n_heads: int | None) -> LoadedCheckpoint:
    config, state = read_hf_directory(directory)
    kind = detect_kind(config, state, hint=source)
    inner, rest = split_backbone(state)
    var_min = config.get("model_type") == "bd3lm" and config.get("var_min", True)
    clip = {k: rest.pop(k) for k in CLIP_BUFFERS if k in rest}
    if rest:
        raise CheckpointError(f"unexpected keys {sorted(rest)[:8]} outside backbone.")
    if var_min and len(clip) != 2:
        missing = sorted(set(CLIP_BUFFERS) - set(clip))
        raise CheckpointError(f"config.json says var_min but missing={missing}")
    heads = config.get("n_heads", n_heads)
    if heads is None:
        raise CheckpointError("config.json has no n_heads")
    dit, weights = adapt_backbone_state(inner, kind, int(heads), what="backbone")
    declared = {
        "vocab_size": ("vocab_size", "backbone.vocab_embed.embedding rows"),
        "hidden_dim": ("hidden_size", "backbone.vocab_embed.embedding columns"),
        "n_blocks": ("n_blocks", "backbone.blocks.*"),
    }
    if dit.adaln:
        declared["cond_dim"] = ("cond_dim", "backbone.sigma_map.mlp.0.weight rows")
    for field, (attr, where) in declared.items():
        if field in config and int(config[field]) != getattr(dit, attr):
            raise CheckpointError(
                f"config.json says {field}={config[field]} but the weights have "
                f"{getattr(dit, attr)} ({where})"
            )
    meta = {k: config[k] for k in ("block_size", "model_length", "cross_attn") if k in config}
    meta["time_conditioning"] = bool(config.get("time_conditioning", kind == "sedd"))
    if config.get("model_type") == "mdlm":
        meta["cross_attn"] = False
    return LoadedCheckpoint(
        source=source, format="hf", kind=kind, dit=dit, weights=weights, clip=clip, meta=meta
    )


def _run_summary(module: Diffusion) -> dict:
    algo = module.algorithm
    return {
        "cross_attn": bool(getattr(algo, "cross_attn", False)),
        "block_size": int(getattr(algo, "block_size", 1)),
        "time_conditioning": bool(getattr(algo, "time_conditioning", False)),
        "model_length": int(getattr(algo, "seq_len", 0)),
    }


def check_compatible(
    module: Diffusion, dit: DiTConfig, meta: dict, kind: str | None, key: str, for_training: bool
) -> None:
    """One UserError line naming every config key on which the checkpoint and the run disagree
    (before any shape mismatch could surface). block_size may differ when fine-tuning."""
    run, run_algo = module.backbone.config, _run_summary(module)
    diffs = []
    fields = [
        ("vocab_size", "vocabulary size (data tokenizer + mask token)"),
        ("hidden_size", "model.hidden_size"),
        ("n_blocks", "model.n_blocks"),
        ("n_heads", "model.n_heads"),
    ]
    if run.adaln and dit.adaln:
        fields.append(("cond_dim", "model.cond_dim"))
    for attr, name in fields:
        if getattr(run, attr) != getattr(dit, attr):
            diffs.append(f"{name}: checkpoint {getattr(dit, attr)}, run {getattr(run, attr)}")
    if (run.causal, run.adaln) != (dit.causal, dit.adaln):
        what = "AR (causal, no adaLN)" if dit.causal else "diffusion (adaLN)"
        diffs.append(f"algo: the checkpoint is a {what} backbone ({kind}), the run's is not")
    if (
        "time_conditioning" in meta
        and bool(meta["time_conditioning"]) != run_algo["time_conditioning"]
    ):
        diffs.append(
            f"algo.time_conditioning: checkpoint {bool(meta['time_conditioning'])}, "
            f"run {run_algo['time_conditioning']}"
        )
    if (
        not for_training
        and run_algo["cross_attn"]
        and meta.get("cross_attn")
        and meta.get("block_size") is not None
        and int(meta["block_size"]) != run_algo["block_size"]
    ):
        diffs.append(f"block_size: checkpoint {meta['block_size']}, run {run_algo['block_size']}")
    if diffs:
        raise UserError(
            f"{key}: the checkpoint's config disagrees with this run: {'; '.join(diffs)}"
        )
    length = meta.get("model_length")
    if length is not None and int(length) != run_algo["model_length"]:
        log.info(
            "%s: checkpoint model_length %s, run model.length %s",
            key,
            length,
            run_algo["model_length"],
        )


def _dit_from_state(checkpoint: dict, module: Diffusion) -> DiTConfig | None:
    """The backbone config our .ckpt implies (None when the weights do not say enough: the
    strict key check of load_weights then reports the problem)."""
    inner, _ = split_backbone(checkpoint["state_dict"])
    try:
        shape = infer_dit_shape(inner)
    except CheckpointError:
        return None
    model_cfg = (checkpoint.get("config") or {}).get("model") or {}
    run = module.backbone.config
    n_heads = int(model_cfg.get("n_heads", run.n_heads))
    if shape["n_blocks"] == 0 or shape["hidden_size"] % n_heads:
        return None
    return DiTConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        cond_dim=shape["cond_dim"] or run.cond_dim,
        n_blocks=shape["n_blocks"],
        n_heads=n_heads,
        # keys cannot show causality: same adaLN as the run -> same kind; no adaLN -> AR
        causal=run.causal if shape["adaln"] == run.adaln else not shape["adaln"],
        adaln=shape["adaln"],
    )


def _ours_meta(checkpoint: dict) -> dict:
    config = checkpoint.get("config") or {}
    algo = config.get("algo") or {}
    meta = {"block_size": config.get("block_size"), "cross_attn": algo.get("cross_attn")}
    if "time_conditioning" in algo:
        meta["time_conditioning"] = algo["time_conditioning"]
    if algo.get("parameterization") == "ar":
        meta["block_size"] = None
    return {k: v for k, v in meta.items() if v is not None}


def load_checkpoint_into(
    module: Diffusion, source: str | LoadedCheckpoint, key: str, for_training: bool
) -> LoadedCheckpoint:
    """The one entry point for `eval.checkpoint_path` (for_training=False) and
    `training.from_pretrained` (for_training=True).

    source: a path / hub id, or what `read_any_checkpoint` returned. Evaluation first requires
    the checkpoint's family to train this run's objective (`check_family`); fine-tuning may
    cross families. Our .ckpt files keep the behaviour of `load_weights` / `load_pretrained`.
    HF directories and the reference's .ckpt load strictly by name after a config comparison
    (`check_compatible`):
    - evaluation: the run uses the file's weights (a reference .ckpt: live weights in the
      backbone and its EMA, mapped by name, as the module's EMA; HF weights are EMA weights);
    - fine-tuning: start from the EMA weights, restart the EMA there.
    The learned clip interval: the file's when evaluating and both sides have one, else the
    run's own, none when the run has none (`checkpoints.ours.clip_buffers`, which logs which).
    """
    loaded = source
    if not isinstance(source, LoadedCheckpoint):
        loaded = read_any_checkpoint(source, key, module.backbone.config.n_heads)
    if not for_training:
        check_family(module, loaded, key)
    if loaded.format == "ours":
        checkpoint = loaded.raw
        dit = _dit_from_state(checkpoint, module)
        if dit is not None:
            check_compatible(module, dit, _ours_meta(checkpoint), None, key, for_training)
        if for_training:
            load_pretrained(module, checkpoint)
        else:
            state = checkpoint["state_dict"]
            clip = clip_buffers(module, state, key, for_training=False)
            load_weights(module, {**checkpoint, "state_dict": with_clip_buffers(state, clip)}, key)
        return loaded
    check_compatible(module, loaded.dit, loaded.meta, loaded.kind, key, for_training)
    _apply_weights(module, loaded, key, for_training)
    return loaded


def _apply_weights(module: Diffusion, loaded: LoadedCheckpoint, key: str, for_training: bool):
    ema_weights = loaded.weights
    live = loaded.live if loaded.live is not None else loaded.weights
    # fine-tuning starts from the EMA weights; evaluation puts the live weights in the backbone
    # and the EMA weights in the module's EMA (or, without one, in the backbone if EMA is used)
    no_ema_object = module.ema is None and module.use_ema_for_eval
    backbone = ema_weights if for_training or no_ema_object else live
    own = module.state_dict()
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    inv_freq = "backbone." + INV_FREQ
    state[inv_freq] = own[inv_freq]
    state |= clip_buffers(module, loaded.clip, key, for_training)
    load_weights(module, {"state_dict": state}, key)
    if module.ema is None:
        return
    module.ema.reset(module.backbone)
    if not for_training and ema_weights is not backbone:
        for name, tensor in ema_weights.items():
            module.ema.shadow[name] = tensor.detach().clone().to(module.ema.shadow[name].device)
        module.ema.num_updates = loaded.ema_num_updates


def trained_length(loaded: LoadedCheckpoint, default: int) -> int:
    """The sampling window: the context the checkpoint was trained with (our checkpoints store
    their config, HF ones `model_length`), else `default`. Never the run's `model.length`
    override, which is the generation length when sampling."""
    if loaded.format == "ours":
        stored = loaded.raw.get("config", {}).get("model", {}).get("length")
    else:
        stored = loaded.meta.get("model_length")
    return int(stored) if stored else int(default)


def stored_backbone(loaded: LoadedCheckpoint) -> str:
    """The `model.backbone` of a checkpoint's network: our .ckpt's stored run config says it
    (older SSD-LM runs: algo.backbone=roberta); HF directories and the reference's .ckpt hold
    DiTs."""
    if loaded.format != "ours":
        return "dit"
    config = loaded.raw.get("config") or {}
    model, algo = config.get("model") or {}, config.get("algo") or {}
    return model.get("backbone") or ("roberta" if algo.get("backbone") == "roberta" else "dit")


def check_backbone(loaded: LoadedCheckpoint, backbone: str, key: str, run: str) -> None:
    """UserError unless the checkpoint's network is the run's `model.backbone` (`run`: what
    the run is, for the message)."""
    stored = stored_backbone(loaded)
    if stored == backbone:
        return
    config = (loaded.raw or {}).get("config") or {}
    name = (config.get("algo") or {}).get("name")
    what = f"algo={name}" if name else loaded.format
    raise UserError(
        f"{key}={loaded.source} is a model.backbone={stored} checkpoint ({what}); {run} runs "
        f"on model.backbone={backbone}"
    )
