"""Our Lightning checkpoints: read with `weights_only`, loaded strictly by name.

A checkpoint written by `diffusion.Diffusion.on_save_checkpoint` holds `state_dict`, `ema`
(shadow weights keyed by parameter name), `config` (the resolved run config) and `format`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from checkpoints.layout import CLIP_BUFFERS, CheckpointError, strict_state_check, strip_prefixes
from utils import UserError

if TYPE_CHECKING:
    from diffusion import Diffusion


def read_checkpoint(path: str, key: str) -> dict:
    """Read a checkpoint file with weights_only=True; `key` names the config key for errors."""
    if not os.path.isfile(path):
        what = " is a directory" if os.path.isdir(path) else ": no such file"
        raise UserError(
            f"{key}={path}{what}; give one of this project's Lightning .ckpt files (HF "
            "directories, hub ids and the reference's .ckpt load through eval.checkpoint_path "
            "or training.from_pretrained)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(
            f"{key}={path} is not a readable checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{key}={path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def check_state(module: Diffusion, checkpoint: dict, key: str) -> dict:
    """The checkpoint's state_dict (compile prefixes stripped) after checking that its names
    and shapes are exactly the module's; UserError naming the keys otherwise."""
    state = strip_prefixes(checkpoint["state_dict"])
    try:
        strict_state_check(module.state_dict(), state, key)
    except CheckpointError as err:
        raise UserError(
            f"{err} (check algo/model/block_size and the tokenizer's vocabulary size)"
        ) from None
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
