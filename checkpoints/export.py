"""Export: our Lightning checkpoint -> an HF directory (`models.hf` classes; the reference's
classes load it too)."""

from __future__ import annotations

import os

from checkpoints.layout import CLIP_BUFFERS, CheckpointError, infer_dit_shape, split_backbone
from utils import UserError, atomic_path


def export_hf(
    checkpoint: dict,
    out_dir: str,
    use_ema: bool = True,
    token_ids: dict[str, int] | None = None,
    extra_files=None,
) -> str:
    """Write our Lightning checkpoint (EMA weights unless use_ema=False, and the learned clip
    interval buffers) as an HF directory: BD3LM format (model_type bd3lm) for BD3-LM and AR
    runs, MDLM format (model_type mdlm) for MDLM and SEDD runs, with the objective named in
    config.json's `parameterization` (ar, subs or sedd). attn_backend is written as sdpa.

    token_ids: {"bos_token_id", "eos_token_id", "mask_token_id", "pad_token_id"} to record in
    config.json (models.hf generate reads them). No `auto_map` is written: the directory ships
    no modeling code, so it loads with `models.hf` (or AutoModelForMaskedLM after importing
    it), never as remote code. extra_files(tmp_dir): called before the directory is moved
    into place, to add files (the tokenizer, a model card). Every file gets the permissions
    of a file created under the process umask (0644 under umask 022)."""
    from models.hf import BD3LM, MDLM, BD3LMConfig, MDLMConfig

    config = checkpoint.get("config")
    if not isinstance(config, dict):
        raise UserError("export: the checkpoint has no run config (not written by this project)")
    algo, model_cfg = config["algo"], config["model"]
    inner, rest = split_backbone(checkpoint["state_dict"])
    ema = checkpoint.get("ema")
    if use_ema and ema is not None:
        inner = {**inner, **ema["shadow"]}
    shape = infer_dit_shape(inner)
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
    # the objective by name: a time-conditioned MDLM and SEDD share this layout
    hf_config.parameterization = str(algo["parameterization"])
    for name, value in (token_ids or {}).items():
        setattr(hf_config, name, int(value))
    if hasattr(hf_config, "auto_map"):
        del hf_config.auto_map  # it would point at configuration_*.py files not shipped here
    model = cls(hf_config)
    state = {f"backbone.{k}": v for k, v in inner.items()}
    state.update({k: rest[k] for k in CLIP_BUFFERS if k in rest and var_min})
    try:
        model.load_strict(state, what="export")
    except CheckpointError as err:
        raise UserError(str(err)) from None
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)
        follow_umask(tmp)
    return out_dir


def follow_umask(directory: str) -> None:
    """chmod each file under `directory` to 0666 less the umask: safetensors writes the
    weights 0600, which would leave an export unreadable to the other users of a shared
    directory."""
    umask = os.umask(0)
    os.umask(umask)
    for parent, _, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~umask)


def as_export_input(loaded) -> dict:
    """A checkpoint read by checkpoints.load.read_any_checkpoint in the reference's pickled
    format (a LoadedCheckpoint with kind, dit, weights (EMA where the file has them), clip and
    meta) as the dict export_hf takes: the run config it implies and the backbone weights."""
    kind, dit, meta = loaded.kind, loaded.dit, loaded.meta
    window = meta.get("model_length")
    if window is None:
        raise UserError(f"{loaded.source}: the run config records no model.length")
    config = {
        "algo": {
            "parameterization": {"ar": "ar", "sedd": "sedd"}.get(kind, "subs"),
            "cross_attn": kind == "bd3lm",
            "time_conditioning": bool(meta.get("time_conditioning", kind == "sedd")),
        },
        "model": {
            "length": int(window),
            "n_heads": dit.n_heads,
            "cond_dim": dit.cond_dim,
            "dropout": 0.0,
        },
        "block_size": int(meta.get("block_size", window)),
    }
    state = {f"backbone.{k}": v for k, v in loaded.weights.items()}
    state.update(loaded.clip)
    return {"config": config, "state_dict": state}
