"""The reference implementation's Lightning `.ckpt` files.

They pickle OmegaConf and tokenizer objects, so they are read with a restricted unpickler
(`checkpoints.unpickle`: only torch / collections / numpy rebuild globals resolve, any other
global becomes an inert stub, nothing in the file runs). Their EMA is an unnamed list of
tensors in parameter-registration order; it is mapped onto names by our DiT's registration
order (the same order, see `checkpoints.layout.parameter_order`) with every shape checked.
"""

from __future__ import annotations

from torch import Tensor

from checkpoints.layout import (
    CHECKPOINT_FORMAT,
    CLIP_BUFFERS,
    CheckpointError,
    LoadedCheckpoint,
    adapt_backbone_state,
    backbone_names,
    detect_kind,
    parameter_order,
    split_backbone,
)
from checkpoints.unpickle import stub_to_plain
from models.dit import DiTConfig


def is_reference_format(raw: dict) -> bool:
    """The reference's .ckpt: an unnamed EMA list, or Lightning hparams without our format tag
    (ours carries `format` and an EMA keyed by name)."""
    ema = raw.get("ema")
    if isinstance(ema, dict) and "shadow_params" in ema:
        return True
    return "hyper_parameters" in raw and raw.get("format") != CHECKPOINT_FORMAT


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


def read_reference(raw: dict, source: str, n_heads: int | None) -> LoadedCheckpoint:
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        raise CheckpointError("not a Lightning checkpoint (no state_dict)")
    inner, rest = split_backbone(raw["state_dict"])
    clip = {k: rest.pop(k) for k in CLIP_BUFFERS if k in rest}
    if rest:
        raise CheckpointError(f"unexpected keys {sorted(rest)[:8]} outside backbone.")
    meta = _reference_meta(raw)
    kind = detect_kind({k: meta[k] for k in ("parameterization", "cross_attn") if k in meta}, inner)
    heads = meta.get("n_heads", n_heads)
    if heads is None:
        raise CheckpointError("the number of attention heads is not recorded; pass n_heads")
    dit, live = adapt_backbone_state(inner, kind, int(heads), what="backbone")
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
    """The reference's unnamed EMA list -> names, by the reference's registration order (our
    DiT registers its parameters in the same order), with the length and every shape checked."""
    names = parameter_order(dit)
    expected = backbone_names(dit)
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
                f"{what}: ema.shadow_params[{i}] has shape {shape} but {name} (registration order) "
                f"has {tuple(expected[name].shape)}"
            )
        mapped[name] = tensor
    return mapped
