"""Loading weights into a built module, strictly by name.

Sources (one entry point, `load_checkpoint_into`, for `eval.checkpoint_path` and
`training.from_pretrained`):
- our Lightning `.ckpt` files (state_dict + EMA keyed by name), read with `weights_only`;
- HF directories (config.json + model.safetensors) and hub ids (the released checkpoints,
  `models.hf`), checked against the run's config first;
- the reference's Lightning `.ckpt` files, which pickle OmegaConf and tokenizer objects: read
  with a restricted unpickler (only torch / collections / numpy rebuild globals resolve; any
  other global becomes an inert stub, so nothing in the file is executed), their unnamed EMA
  list mapped onto names by the SPEC 3.8 order with every shape checked.
Also: `sanity_check_perplexity` (catches silently mis-loaded weights) and `export_hf` (our
checkpoint -> an HF directory that the reference's classes load too).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import Tensor

import models.hf.loading as hf_loading
from diffusion import CHECKPOINT_FORMAT, Diffusion
from models.dit import DiTConfig
from models.hf.loading import CheckpointError
from restricted_unpickle import restricted_load, stub_to_plain
from utils import UserError, atomic_path, get_logger

COMPILED_PREFIX = "_orig_mod."


def read_checkpoint(path: str, key: str) -> dict:
    """Read a checkpoint file with weights_only=True; `key` names the config key for errors."""
    if os.path.isdir(path):
        raise UserError(
            f"{key}={path} is a directory; HF-format checkpoint directories are not supported "
            "yet: give a Lightning .ckpt file"
        )
    if not os.path.isfile(path):
        hint = (
            "hub checkpoints are not supported yet"
            if "/" in path and not path.startswith((".", "/"))
            else "no such file"
        )
        raise UserError(f"{key}={path}: {hint}; give the path of a Lightning .ckpt file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(
            f"{key}={path} is not a readable checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{key}={path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


CLIP_BUFFERS = ("sampling_eps_min", "sampling_eps_max")


def check_state(module: Diffusion, checkpoint: dict, key: str) -> dict:
    """The checkpoint's state_dict (compile prefixes stripped) after checking that its names
    and shapes are exactly the module's; UserError naming the keys otherwise."""
    state = {k.replace(COMPILED_PREFIX, ""): v for k, v in checkpoint["state_dict"].items()}
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise UserError(
            f"{key}: checkpoint keys do not match the configured model: "
            f"missing={missing[:5]} unexpected={unexpected[:5]} (check algo/model/block_size)"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise UserError(
                f"{key}: {name} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(own[name].shape)} in the configured model (check model.* and the "
                "tokenizer's vocabulary size)"
            )
    return state


def load_weights(module: Diffusion, checkpoint: dict, key: str) -> None:
    """Load state_dict strictly by name (shapes checked), then the EMA if present."""
    module.load_state_dict(check_state(module, checkpoint, key), strict=True)
    if module.ema is not None and "ema" in checkpoint:
        try:
            module.ema.load_state_dict(checkpoint["ema"])
        except (KeyError, ValueError) as err:
            raise UserError(f"{key}: {err}") from None


def load_pretrained(module: Diffusion, checkpoint: dict) -> None:
    """Stage-2 fine-tuning (`training.from_pretrained`): start from the checkpoint's EMA weights
    when it has them (released checkpoints are EMA weights too), restart the EMA from them
    (num_updates 0) and keep this run's clip interval (the reference resets it the same way).
    A diffusion checkpoint without clip buffers (e.g. MDLM pre-training) may seed a BD3-LM.
    """
    key = "training.from_pretrained"
    state = dict(checkpoint["state_dict"])
    own = module.state_dict()
    for name in CLIP_BUFFERS:
        if name in own:
            state[name] = own[name]
        else:
            state.pop(name, None)
    ema = checkpoint.get("ema")
    if ema is not None:
        state.update({f"backbone.{n}": t for n, t in ema["shadow"].items()})
    load_weights(module, {"state_dict": state}, key)
    if module.ema is not None:
        module.ema.reset(module.backbone)


# ----------------------------------------------------------------------------------------------
# Every checkpoint source behind one entry point (eval.checkpoint_path, training.from_pretrained)
# ----------------------------------------------------------------------------------------------
log = get_logger("bd3lms")


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checkpoint read into memory, before any module exists.

    format: "ours" (our Lightning .ckpt: `raw` holds it), "hf" (an HF directory or hub id) or
    "reference" (the reference's pickled Lightning .ckpt). For the last two: `dit` is the
    backbone config the weights imply, `weights` the backbone-level tensors to use (EMA weights
    where the file has them; released HF weights are EMA weights), `live` the raw weights of a
    reference .ckpt that also has an EMA, `clip` the stored sampling_eps buffers and `meta` what
    the file states about the run (block_size, model_length, cross_attn, time_conditioning).
    """

    source: str
    format: str
    kind: str | None = None
    raw: dict | None = None
    dit: DiTConfig | None = None
    weights: dict[str, Tensor] | None = None
    live: dict[str, Tensor] | None = None
    clip: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)
    ema_num_updates: int = 0


def read_any_checkpoint(path: str, key: str, n_heads: int | None = None) -> LoadedCheckpoint:
    """Read `path` (hub id, HF directory, our .ckpt or the reference's .ckpt) without building
    a module, so that a bad path fails before anything is written. n_heads: the run's
    model.n_heads, used only where the file does not say (it cannot be read from shapes)."""
    try:
        if os.path.isdir(path) or hf_loading.is_hub_id(path):
            directory = hf_loading.resolve_pretrained(path)
            return _read_hf(directory, path, n_heads)
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
                return _read_reference(raw, path, n_heads)
            return LoadedCheckpoint(source=path, format="ours", raw=raw)
        try:
            raw = restricted_load(path)
        except Exception as err:  # noqa: BLE001 - any failure means a bad file for the user
            raise UserError(
                f"{key}={path} is not a readable checkpoint ({type(err).__name__})"
            ) from None
        return _read_reference(raw, path, n_heads)
    except CheckpointError as err:
        raise UserError(f"{key}={path}: {err}") from None


def is_reference_format(raw: dict) -> bool:
    """The reference's .ckpt: an unnamed EMA list, or Lightning hparams without our format tag
    (ours carries `format` and an EMA keyed by name)."""
    ema = raw.get("ema")
    if isinstance(ema, dict) and "shadow_params" in ema:
        return True
    return "hyper_parameters" in raw and raw.get("format") != CHECKPOINT_FORMAT


def _read_hf(directory: str, source: str, n_heads: int | None) -> LoadedCheckpoint:
    config, state = hf_loading.read_hf_directory(directory)
    kind = hf_loading.detect_kind(config, state, hint=source)
    inner, rest = hf_loading.split_backbone(state)
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
    dit, weights = hf_loading.adapt_backbone_state(inner, kind, int(heads), what="backbone")
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


def _reference_meta(raw: dict) -> dict:
    """What the pickled run config says (best effort: OmegaConf nodes arrive as stubs)."""
    try:
        hparams = stub_to_plain(raw.get("hyper_parameters")) or {}
        config = hparams.get("config", hparams)
        algo, model = config.get("algo", {}), config.get("model", {})
        meta = {
            "parameterization": algo.get("parameterization"),
            "cross_attn": algo.get("cross_attn"),
            "time_conditioning": algo.get("time_conditioning"),
            "block_size": config.get("block_size"),
            "model_length": model.get("length"),
            "n_heads": model.get("n_heads"),
        }
        return {k: v for k, v in meta.items() if v is not None}
    except Exception:  # noqa: BLE001 - metadata only; the weights are checked strictly anyway
        return {}


def _read_reference(raw: dict, source: str, n_heads: int | None) -> LoadedCheckpoint:
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        raise CheckpointError("not a Lightning checkpoint (no state_dict)")
    inner, rest = hf_loading.split_backbone(raw["state_dict"])
    clip = {k: rest.pop(k) for k in CLIP_BUFFERS if k in rest}
    if rest:
        raise CheckpointError(f"unexpected keys {sorted(rest)[:8]} outside backbone.")
    meta = _reference_meta(raw)
    parameterization = meta.get("parameterization")
    if parameterization in ("ar", "sedd"):
        kind = parameterization
    elif parameterization == "subs":
        kind = "bd3lm" if meta.get("cross_attn") else "mdlm"
    else:
        kind = hf_loading.detect_kind({}, inner)
    heads = meta.get("n_heads", n_heads)
    if heads is None:
        raise CheckpointError("the number of attention heads is not recorded; pass n_heads")
    dit, live = hf_loading.adapt_backbone_state(inner, kind, int(heads), what="backbone")
    loaded = LoadedCheckpoint(
        source=source, format="reference", kind=kind, dit=dit, weights=live, clip=clip, meta=meta
    )
    ema = raw.get("ema")
    if ema is not None:
        loaded.weights = map_ema_shadow_params(ema.get("shadow_params"), dit, "EMA")
        loaded.live = live
        loaded.ema_num_updates = int(ema.get("num_updates") or 0)
    return loaded


def map_ema_shadow_params(shadow: list, dit: DiTConfig, what: str) -> dict[str, Tensor]:
    """The reference's unnamed EMA list -> names, by the SPEC 3.8 order (our DiT registers its
    parameters in that order), with the length and every shape checked."""
    names = hf_loading.parameter_order(dit)
    expected = hf_loading.backbone_names(dit)
    if not isinstance(shadow, list | tuple) or len(shadow) != len(names):
        got = len(shadow) if isinstance(shadow, list | tuple) else type(shadow).__name__
        raise CheckpointError(
            f"{what}: ema.shadow_params has {got} entries but the model has {len(names)} "
            "trainable parameters"
        )
    mapped = {}
    for i, (name, tensor) in enumerate(zip(names, shadow, strict=True)):
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != tuple(expected[name].shape):
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise CheckpointError(
                f"{what}: ema.shadow_params[{i}] has shape {shape} but {name} (SPEC 3.8 order) "
                f"has {tuple(expected[name].shape)}"
            )
        mapped[name] = tensor
    return mapped


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
    inner, _ = hf_loading.split_backbone(checkpoint["state_dict"])
    try:
        shape = hf_loading.infer_dit_shape(inner)
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

    source: a path / hub id, or what `read_any_checkpoint` returned. Our .ckpt files keep the
    behaviour of `load_weights` / `load_pretrained`. HF directories and the reference's .ckpt
    load strictly by name after a config comparison (`check_compatible`):
    - evaluation: the run uses the file's weights (a reference .ckpt: live weights in the
      backbone and its EMA, mapped by name, as the module's EMA; HF weights are EMA weights) and
      the file's learned clip interval when both sides have one;
    - fine-tuning: start from the EMA weights, restart the EMA there, keep the run's interval.
    """
    n_heads = module.backbone.config.n_heads
    loaded = (
        source
        if isinstance(source, LoadedCheckpoint)
        else read_any_checkpoint(source, key, n_heads)
    )
    if loaded.format == "ours":
        checkpoint = loaded.raw
        dit = _dit_from_state(checkpoint, module)
        if dit is not None:
            check_compatible(module, dit, _ours_meta(checkpoint), None, key, for_training)
        if for_training:
            load_pretrained(module, checkpoint)
        else:
            load_weights(module, checkpoint, key)
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
    inv_freq = "backbone." + hf_loading.INV_FREQ
    state[inv_freq] = own[inv_freq]
    for name in CLIP_BUFFERS:
        if name in own:
            keep_file = not for_training and name in loaded.clip
            state[name] = loaded.clip[name].reshape(()).float() if keep_file else own[name]
    load_weights(module, {"state_dict": state}, key)
    if module.ema is None:
        return
    module.ema.reset(module.backbone)
    if not for_training and ema_weights is not backbone:
        for name, tensor in ema_weights.items():
            module.ema.shadow[name] = tensor.detach().clone().to(module.ema.shadow[name].device)
        module.ema.num_updates = loaded.ema_num_updates


# ----------------------------------------------------------------------------------------------
# Loading sanity check (a silently mis-loaded checkpoint gives garbage, bd3lms #31)
# ----------------------------------------------------------------------------------------------
# Test perplexity on OpenWebText reported in the paper (Table 4; diffusion values are bounds).
PAPER_OWT_PPL = {
    "kuleshov-group/bd3lm-owt-block_size4": 20.73,
    "kuleshov-group/bd3lm-owt-block_size8": 21.68,
    "kuleshov-group/bd3lm-owt-block_size16": 22.27,
    "kuleshov-group/bd3lm-owt-block_size1024-pretrain": 23.00,  # MDLM-style stage 1
    "kuleshov-group/mdlm-owt": 23.00,
    "kuleshov-group/mdlm-noeos-owt": 23.00,
    "kuleshov-group/sedd-noeos-owt": 24.10,
    "kuleshov-group/ar-noeos-owt": 17.54,
}


def ppl_threshold(path: str, default: float | None = None, factor: float = 2.0) -> float | None:
    """`factor` x the paper's OWT figure for a released checkpoint, else `default`."""
    name = path.rstrip("/")
    for repo, ppl in PAPER_OWT_PPL.items():
        if name == repo or name.endswith("/" + repo.split("/")[1]):
            return factor * ppl
    return default


@torch.no_grad()
def sanity_check_perplexity(
    module: Diffusion, batches, threshold: float | None, what: str, max_batches: int = 4
) -> float:
    """Perplexity of `module` (EMA weights when it evaluates with them) on the first
    `max_batches` of `batches` (dicts with input_ids and attention_mask), computed as
    validation does; logs a loud warning when it exceeds `threshold`. Returns the perplexity."""
    was_training = module.training
    module.eval()
    swap = module.ema is not None and module.use_ema_for_eval
    if swap:
        module.ema.store(module.backbone)
        module.ema.copy_to(module.backbone)
    try:
        eps_min, eps_max = (
            torch.tensor(e, dtype=torch.float32, device=module.device)
            for e in module.algorithm.eval_interval()
        )
        generator = torch.Generator(device=module.device).manual_seed(0)
        nll_sum, count = 0.0, 0.0
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            x0 = batch["input_ids"].to(module.device)
            mask = batch["attention_mask"].to(module.device)
            out = module.algorithm.loss(
                module.net, x0, mask, eps_min, eps_max, False, generator=generator
            )
            nll_sum += float(out.nlls.sum())
            count += float(out.token_mask.sum())
    finally:
        if swap:
            module.ema.restore(module.backbone)
        module.train(was_training)
    if count == 0:
        raise UserError(f"{what}: no tokens to measure the loading sanity check on")
    ppl = math.exp(nll_sum / count)
    if threshold is not None and ppl > threshold:
        banner = "!" * 78
        log.warning(
            "\n%s\n%s: perplexity %.2f on %d tokens exceeds the sanity threshold %.2f.\n"
            "The weights may have loaded wrongly (wrong tokenizer, block size or checkpoint "
            "format), or the data differ from the checkpoint's. Check before trusting results.\n"
            "%s",
            banner,
            what,
            ppl,
            int(count),
            threshold,
            banner,
        )
    else:
        log.info("%s: loading sanity check perplexity %.2f (threshold %s)", what, ppl, threshold)
    return ppl


# ----------------------------------------------------------------------------------------------
# Export: our checkpoint -> an HF directory (the reference's classes load it too)
# ----------------------------------------------------------------------------------------------
def export_hf(checkpoint: dict, out_dir: str, use_ema: bool = True) -> str:
    """Write our Lightning checkpoint (EMA weights unless use_ema=False, and the learned clip
    interval buffers) as an HF directory: BD3LM format (model_type bd3lm) for BD3-LM and AR
    runs, MDLM format (model_type mdlm) for MDLM runs. attn_backend is written as sdpa."""
    from models.hf import BD3LM, MDLM, BD3LMConfig, MDLMConfig

    config = checkpoint.get("config")
    if not isinstance(config, dict):
        raise UserError("export: the checkpoint has no run config (not written by this project)")
    algo, model_cfg = config["algo"], config["model"]
    inner, rest = hf_loading.split_backbone(checkpoint["state_dict"])
    ema = checkpoint.get("ema")
    if use_ema and ema is not None:
        inner = {**inner, **ema["shadow"]}
    shape = hf_loading.infer_dit_shape(inner)
    common = {
        "vocab_size": shape["vocab_size"],
        "model_length": int(model_cfg["length"]),
        "hidden_dim": shape["hidden_size"],
        "cond_dim": shape["cond_dim"] or int(model_cfg["cond_dim"]),
        "n_blocks": shape["n_blocks"],
        "n_heads": int(model_cfg["n_heads"]),
        "dropout": float(model_cfg["dropout"]),
        "time_conditioning": bool(algo.get("time_conditioning", False)),
        "return_dict": False,
    }
    is_ar = algo["parameterization"] == "ar"
    var_min = all(k in rest for k in CLIP_BUFFERS)
    if not is_ar and not algo.get("cross_attn") and not var_min:
        cls, hf_config = MDLM, MDLMConfig(**common)
    else:
        cls = BD3LM
        clip = {k: float(rest[k]) for k in CLIP_BUFFERS if k in rest}
        hf_config = BD3LMConfig(
            block_size=1 if is_ar else int(config["block_size"]),
            cross_attn=bool(algo.get("cross_attn")) and not is_ar,
            adaln=shape["adaln"],
            attn_backend="sdpa",
            causal=is_ar,
            var_min=var_min,
            sampling_eps_min=clip.get("sampling_eps_min", 1e-3),
            sampling_eps_max=clip.get("sampling_eps_max", 0.999),
            **common,
        )
    model = cls(hf_config)
    state = {f"backbone.{k}": v for k, v in inner.items()}
    state.update({k: rest[k] for k in CLIP_BUFFERS if k in rest and var_min})
    try:
        model.load_strict(state, what="export")
    except CheckpointError as err:
        raise UserError(str(err)) from None
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
    return out_dir
