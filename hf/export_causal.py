"""Export of a pretrained-causal-LM backbone (model.backbone=hf_causal, models.hf_causal) as a
plain transformers causal LM directory: `AutoModelForCausalLM.from_pretrained(DIR)` loads it
with transformers' own class (no remote code, no import of this project), and
`models.hf_causal.from_pretrained(DIR)` (models.pretrained.load_causal_lm) reads it back
exactly: the mask token is in the saved tokenizer and its row in the saved embedding, so no
row is added on the way back.

- `export_causal_lm(model, tokenizer, out_dir, fields)`: a plain transformers causal LM (or
  the HFCausalLM wrapping one) and its tokenizer with the mask token -> the directory.
- `export_causal_checkpoint(checkpoint, out_dir, use_ema)`: our checkpoint dict of an
  hf_causal run -> the directory; the network is rebuilt from the run's `model.pretrained`
  (architecture, tokenizer, the mask row as training added it), then takes the checkpoint's
  weights (EMA where the checkpoint has an EMA, unless use_ema=False).

config.json gains the BD3-LM fields (`FIELDS`): `bd3lm_objective` (the run's algo: bd3lm,
mdlm or ar), `bd3lm_block_size` (K as the objective used it: 1 for ar, L for mdlm),
`bd3lm_model_length` (L, the trained context), `mask_token_id`, `bd3lm_token_shift` (what the
backbone applied: False for ar, which reads plain next-token logits) and
`bd3lm_clean_attention`; with a learned clip interval, `bd3lm_sampling_eps_min` / `_max`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from checkpoints.layout import CLIP_BUFFERS, CheckpointError, split_backbone, strict_state_check
from utils import UserError, atomic_path, first_line, follow_umask

# the config.json fields this export adds (besides the model's own): name -> type
FIELDS = {
    "bd3lm_objective": str,
    "bd3lm_block_size": int,
    "bd3lm_model_length": int,
    "mask_token_id": int,
    "bd3lm_token_shift": bool,
    "bd3lm_clean_attention": str,
}
CLIP_FIELDS = {f"bd3lm_{name}": float for name in CLIP_BUFFERS}  # optional: a learned interval
INNER = "model."  # HFCausalLM holds the transformers model as `model`

CARD = """---
library_name: transformers
tags: [block-diffusion, bd3lm, causal-lm]
---
# {name}

`{pretrained}` adapted with the {objective} objective of a BD3-LM framework run (block
diffusion: "Block Diffusion: Interpolating Between Autoregressive and Diffusion Language
Models", ICLR 2025): block size {block_size}, trained context {model_length} tokens, token
shift {token_shift}, clean-stream attention `{clean_attention}`, mask token id
{mask_token_id} (in the tokenizer here and in the embedding). Weights: {weights}.

A plain `{architecture}`: `AutoModelForCausalLM.from_pretrained(PATH)` loads it (no remote
code). The framework reads it back with its block-diffusion layouts and samplers:
`model=hf_causal model.pretrained=PATH` with the keys above (config.json names them:
`bd3lm_block_size`, `bd3lm_token_shift`, `bd3lm_clean_attention`, `mask_token_id`).
"""


def export_causal_lm(
    model: nn.Module, tokenizer, out_dir: str, fields: dict[str, Any], card: str | None = None
) -> str:
    """Write `model` (a transformers causal LM, or the models.hf_causal.HFCausalLM wrapping one)
    and `tokenizer` (with its mask token, whose row the embedding has) as the new HF directory
    `out_dir`: config.json with `fields` added (every key of FIELDS, and CLIP_FIELDS where the
    run learned a clip interval; the model's config object is not changed), the weights in
    their dtype, the tokenizer (padding on the left) and `card` as README.md when given. Every
    file gets the permissions of a file created under the process umask. -> out_dir.
    ValueError for missing or unknown fields, or a mask id the tokenizer or embedding lacks."""
    from hf.export import write_tokenizer
    from models.hf_causal import HFCausalLM

    inner = model.model if isinstance(model, HFCausalLM) else model
    types = {**FIELDS, **CLIP_FIELDS}
    missing, unknown = sorted(set(FIELDS) - set(fields)), sorted(set(fields) - set(types))
    if missing or unknown:
        raise ValueError(f"export_causal_lm: fields missing {missing}, unknown {unknown}")
    mask_id = fields["mask_token_id"]
    rows = inner.get_input_embeddings().num_embeddings
    if tokenizer.mask_token_id != mask_id or mask_id >= rows:
        raise ValueError(
            f"export_causal_lm: mask_token_id={mask_id}, but the tokenizer's mask id is "
            f"{tokenizer.mask_token_id} and the embedding has {rows} rows"
        )
    with atomic_path(out_dir) as tmp:
        inner.save_pretrained(tmp)
        path = os.path.join(tmp, "config.json")
        with open(path) as f:
            config = json.load(f)
        config.pop("auto_map", None)  # transformers' own class: nothing remote
        config.update({k: types[k](v) for k, v in fields.items()})
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        write_tokenizer(tmp, tokenizer)
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card)
        follow_umask(tmp)
    return out_dir


def export_causal_checkpoint(checkpoint: dict, out_dir: str, use_ema: bool = True) -> str:
    """Our checkpoint dict of an hf_causal run (config.model: pretrained, token_shift,
    clean_attention, length; config.algo, config.block_size; the backbone's weights under
    `backbone.model.*`, EMA shadow names relative to the backbone) -> the HF directory
    `out_dir` (export_causal_lm, with a model card). The network is rebuilt from
    model.pretrained, which must still load (models.pretrained.load_causal_lm); UserError, one
    line, when it does not or when the weights do not fit it."""
    import registry
    from models.hf_causal import ensure_mask_token
    from models.pretrained import load_causal_lm

    config = checkpoint.get("config")
    if not isinstance(config, dict):
        raise UserError("export: the checkpoint has no run config (not written by this project)")
    algo, model_cfg = config["algo"], config["model"]
    pretrained = str(model_cfg["pretrained"])
    try:
        model, tokenizer = load_causal_lm(pretrained, key="model.pretrained")
    except (OSError, ValueError) as err:  # from transformers; resolve's UserError passes
        raise UserError(
            f"model.pretrained={pretrained}: cannot be loaded to rebuild the network "
            f"({first_line(err)})"
        ) from None
    mask_id = ensure_mask_token(model, tokenizer)
    inner, rest = split_backbone(checkpoint["state_dict"])
    weights = _under(inner, INNER)
    ema = checkpoint.get("ema") if use_ema else None
    try:
        strict_state_check(model.state_dict(), weights, "export")
        model.load_state_dict(weights)
        if ema is not None:
            _copy_ema(model, _under(ema["shadow"], INNER))
    except CheckpointError as err:
        raise UserError(f"{err} (model.pretrained={pretrained})") from None
    L = int(model_cfg["length"])
    causal = registry.objective_spec(str(algo["name"])).causal
    fields = {
        "bd3lm_objective": str(algo["name"]),
        "bd3lm_block_size": registry.block_size_of(algo, L, int(config["block_size"])),
        "bd3lm_model_length": L,
        "mask_token_id": mask_id,
        "bd3lm_token_shift": bool(model_cfg["token_shift"]) and not causal,
        "bd3lm_clean_attention": str(model_cfg["clean_attention"]),
    }
    fields.update({f"bd3lm_{k}": float(rest[k]) for k in CLIP_BUFFERS if k in rest})
    card = CARD.format(
        name=os.path.basename(os.path.normpath(out_dir)),
        pretrained=pretrained,
        objective=fields["bd3lm_objective"],
        block_size=fields["bd3lm_block_size"],
        model_length=L,
        token_shift=fields["bd3lm_token_shift"],
        clean_attention=fields["bd3lm_clean_attention"],
        mask_token_id=mask_id,
        weights="EMA" if ema is not None else "live",
        architecture=type(model).__name__,
    )
    return export_causal_lm(model, tokenizer, out_dir, fields, card)


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` whose names start with `prefix`, without it; UserError when some
    do not (not the layout of an HFCausalLM)."""
    outside = sorted(k for k in state if not k.startswith(prefix))
    if outside:
        raise UserError(
            f"export: weights {outside[:3]} are not under the backbone's `{prefix}`: not a "
            "model.backbone=hf_causal checkpoint"
        )
    return {k[len(prefix) :]: v for k, v in state.items()}


@torch.no_grad()
def _copy_ema(model: nn.Module, shadow: dict[str, torch.Tensor]) -> None:
    """Copy the EMA `shadow` (parameter names, as models.ema keeps them: a tied output layer
    once, under the embedding's name) into `model`'s parameters; CheckpointError unless the
    names and shapes are exactly its trainable parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    strict_state_check(params, shadow, "export (EMA)")
    for name, tensor in shadow.items():
        params[name].copy_(tensor)
