"""Our Lightning checkpoints: read with `weights_only`, loaded strictly by name.

A checkpoint written by `diffusion.Diffusion.on_save_checkpoint` holds `state_dict`, `ema`
(shadow weights keyed by parameter name), `config` (the resolved run config) and `format`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from checkpoints.layout import CLIP_BUFFERS, CheckpointError, strict_state_check, strip_prefixes
from utils import UserError, get_logger

if TYPE_CHECKING:
    from diffusion import Diffusion

log = get_logger("bd3lms")


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
    """Load state_dict strictly by name (shapes checked), then the EMA if present: into the
    module's EMA, or, when the run keeps none (training.ema=0) but evaluates with EMA weights
    (eval.disable_ema=false), into the backbone, so that the checkpoint's EMA weights are the
    ones evaluated either way."""
    module.load_state_dict(check_state(module, checkpoint, key), strict=True)
    if "ema" not in checkpoint:
        return
    try:
        if module.ema is not None:
            module.ema.load_state_dict(checkpoint["ema"])
        elif module.use_ema_for_eval:
            params = dict(module.backbone.named_parameters())
            shadow = checkpoint["ema"]["shadow"]
            if shadow.keys() != {n for n, p in params.items() if p.requires_grad}:
                raise KeyError(f"EMA keys differ from the backbone's: {sorted(shadow)[:3]}...")
            with torch.no_grad():
                for name, tensor in shadow.items():
                    params[name].copy_(tensor)
            log.info("%s: the checkpoint's EMA weights are evaluated (training.ema=0)", key)
    except (KeyError, ValueError) as err:
        raise UserError(f"{key}: {err}") from None


def _interval(buffers: Mapping[str, Tensor]) -> str:
    return "[" + ", ".join(f"{float(buffers[name]):.4g}" for name in CLIP_BUFFERS) + "]"


def clip_buffers(
    module: Diffusion, stored: Mapping[str, Tensor], key: str, for_training: bool
) -> dict[str, Tensor]:
    """The clip interval buffers (`sampling_eps_min/max`, Sec. 4) to load into `module`, given
    those of the checkpoint (`stored`): the checkpoint's when evaluating and both sides have
    them; the run's own when fine-tuning (the search restarts from the run's interval, as in
    the reference) or when the checkpoint has none; none when the run has none (an MDLM run of
    a K = L BD3-LM checkpoint). One log line says which. UserError for half an interval."""
    stored = {name: stored[name] for name in CLIP_BUFFERS if name in stored}
    if len(stored) == 1:
        raise UserError(
            f"{key}: the checkpoint has {next(iter(stored))} without its pair "
            f"(the learned clip interval is {' + '.join(CLIP_BUFFERS)})"
        )
    own = module.state_dict()
    own = {name: own[name] for name in CLIP_BUFFERS if name in own}
    if not own:
        if stored:
            log.info(
                "%s: the checkpoint's clip interval %s is not used: this run has none "
                "(algo.var_min=false)",
                key,
                _interval(stored),
            )
        return {}
    if not stored:
        log.info(
            "%s: the checkpoint has no clip interval; the run's %s is used", key, _interval(own)
        )
        return own
    if for_training:
        log.info(
            "%s: fine-tuning starts from the run's clip interval %s, not the checkpoint's %s",
            key,
            _interval(own),
            _interval(stored),
        )
        return own
    log.info("%s: the checkpoint's clip interval %s is used", key, _interval(stored))
    return {name: stored[name].reshape(()).float() for name in CLIP_BUFFERS}


def with_clip_buffers(state: Mapping[str, Tensor], clip: Mapping[str, Tensor]) -> dict:
    """`state` with its clip interval buffers replaced by `clip` (none when `clip` is empty)."""
    return {k: v for k, v in state.items() if k not in CLIP_BUFFERS} | dict(clip)


def load_pretrained(module: Diffusion, checkpoint: dict) -> None:
    """Stage-2 fine-tuning (`training.from_pretrained`): start from the checkpoint's EMA weights
    when it has them (released checkpoints are EMA weights too), restart the EMA from them
    (num_updates 0) and keep this run's clip interval (the reference resets it the same way).
    A checkpoint of another family (e.g. MDLM pre-training, no clip buffers) may seed a BD3-LM.
    """
    key = "training.from_pretrained"
    state = checkpoint["state_dict"]
    state = with_clip_buffers(state, clip_buffers(module, state, key, for_training=True))
    ema = checkpoint.get("ema")
    if ema is not None:
        state.update({f"backbone.{n}": t for n, t in ema["shadow"].items()})
    load_weights(module, {"state_dict": state}, key)
    if module.ema is not None:
        module.ema.reset(module.backbone)
