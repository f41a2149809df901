"""Loading weights into a built module, strictly by name, with `weights_only` unpickling.

Sources: our Lightning `.ckpt` files (state_dict + EMA keyed by name). The released HF
checkpoints and the reference's pickled `.ckpt` files need adapters that are not built yet:
they fail here with one clear line instead of loading wrongly.
"""

from __future__ import annotations

import os

import torch

from diffusion import Diffusion
from utils import UserError

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


def load_weights(module: Diffusion, checkpoint: dict, key: str) -> None:
    """Load state_dict strictly by name (shapes checked), then the EMA if present."""
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
    module.load_state_dict(state, strict=True)
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
