"""Checkpoint layouts: reading released / exported checkpoints into plain tensors, strictly by
name, and the helpers every format shares (one copy each: prefixes, clip buffers, the strict key
check, the DiT config inferred from weights, the released-repo table, the rotary check).

No Lightning, no Hydra: callers get `CheckpointError` (a ValueError whose one-line message names
the keys) and turn it into their own error type.

- `resolve_pretrained(name_or_path)`: a local HF directory, or a hub id fetched with
  huggingface_hub (offline -> a one-line error saying how to proceed).
- `read_hf_directory(path)`: config.json + model.safetensors (or pytorch_model.bin, read with
  weights_only) -> (config dict, state dict).
- The keyed backbone adapter (`BackboneKind`, `adapt_backbone_state`): turns a state dict of the
  reference's DiT family (BD3-LM, MDLM, SEDD with time conditioning, AR causal without adaLN)
  into our DiT's names and config, refusing anything that does not match exactly.
- `strict_state_check`: missing / unexpected / shape-mismatched keys raise with their names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from data.config import hub_offline
from models.attention import rotary_inv_freq
from models.dit import DiT, DiTConfig
from utils import get_logger

BACKBONE_PREFIX = "backbone."
COMPILED_PREFIX = "_orig_mod."
INV_FREQ = "rotary_emb.inv_freq"  # a buffer recomputed from the head dim, never trusted
CLIP_BUFFERS = ("sampling_eps_min", "sampling_eps_max")  # the learned clip interval (Sec. 4)
CHECKPOINT_FORMAT = "bd3lms/1"  # the `format` tag of our Lightning checkpoints
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message is one line naming the keys."""


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... (+{len(keys) - limit} more)' if len(keys) > limit else ''}]"


# ----------------------------------------------------------------------------------------------
# Locating and reading HF directories
# ----------------------------------------------------------------------------------------------
def is_hub_id(path: str) -> bool:
    """`org/name` that is not an existing local path and not a file name."""
    return (
        not os.path.exists(path)
        and HUB_ID.match(path) is not None
        and not path.endswith((".ckpt", ".pt", ".bin", ".safetensors"))
    )


def resolve_pretrained(
    name_or_path: str, cache_dir: str | None = None, revision: str | None = None
) -> str:
    """A local directory for `name_or_path`: itself when it exists, else a hub snapshot."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if not is_hub_id(name_or_path):
        raise CheckpointError(f"{name_or_path}: no such directory (and not a hub id org/name)")
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_FILE, *WEIGHT_FILES]
    try:
        return snapshot_download(
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=hub_offline(),
        )
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line for the user
        if hub_offline():
            raise CheckpointError(
                f"{name_or_path} cannot be downloaded offline (HF_HUB_OFFLINE=1); download it "
                "to a directory and pass its path"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{name_or_path} could not be downloaded from the hub ({type(err).__name__}: "
            f"{first}); download it to a directory and pass its path"
        ) from None


def read_config_json(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not an HF model directory)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def read_weights(directory: str) -> dict[str, Tensor]:
    """model.safetensors, else pytorch_model.bin (weights_only); sharded folders are refused."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path, device="cpu")
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{path} is not readable ({type(err).__name__})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
        return state
    raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def read_hf_directory(directory: str) -> tuple[dict, dict[str, Tensor]]:
    return read_config_json(directory), read_weights(directory)


# ----------------------------------------------------------------------------------------------
# Strict key checks
# ----------------------------------------------------------------------------------------------
def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove `_orig_mod.` (torch.compile) wherever it occurs in a key, for every key."""
    return {k.replace(COMPILED_PREFIX, ""): v for k, v in state.items()}


def strict_state_check(
    expected: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    what: str,
    optional: Iterable[str] = (),
) -> None:
    """Raise CheckpointError unless `state` has exactly the keys (up to `optional`) and shapes of
    `expected`."""
    optional = set(optional)
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: keys do not match: missing={_names(missing)} unexpected={_names(unexpected)}"
        )
    wrong = [
        f"{name} has shape {tuple(state[name].shape)} in the checkpoint but "
        f"{tuple(tensor.shape)} in the model"
        for name, tensor in expected.items()
        if name in state and tuple(state[name].shape) != tuple(tensor.shape)
    ]
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(f"{what}: {'; '.join(wrong[:3])}{more}")


def check_inv_freq(state: Mapping[str, Tensor], model_inv_freq: Tensor, key: str) -> None:
    """The rotary buffer is recomputed; a stored copy must agree with it (else the head dim or
    the rotary base differs)."""
    stored = state.get(key)
    if stored is None:
        return
    if stored.shape != model_inv_freq.shape or not torch.allclose(
        stored.float().cpu(), model_inv_freq.float().cpu(), rtol=1e-4, atol=1e-6
    ):
        raise CheckpointError(
            f"{key} differs from the recomputed rotary frequencies (shape "
            f"{tuple(stored.shape)} vs {tuple(model_inv_freq.shape)}): check n_heads / hidden_dim"
        )


# ----------------------------------------------------------------------------------------------
# The keyed backbone adapter
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BackboneKind:
    """What the reference's code implies for each family of released weights."""

    name: str
    adaln: bool  # sigma_map + adaLN_modulation keys exist
    causal: bool  # token-causal attention (AR)
    time_conditioning: bool  # sigma is fed for real (SEDD) or zeroed (MDLM / BD3-LM)
    cross_attn: bool  # BD3-LM two-stream [x_t ; x_0] training input


KINDS = {
    "bd3lm": BackboneKind(
        "bd3lm", adaln=True, causal=False, time_conditioning=False, cross_attn=True
    ),
    "mdlm": BackboneKind(
        "mdlm", adaln=True, causal=False, time_conditioning=False, cross_attn=False
    ),
    "sedd": BackboneKind(
        "sedd", adaln=True, causal=False, time_conditioning=True, cross_attn=False
    ),
    "ar": BackboneKind("ar", adaln=False, causal=True, time_conditioning=False, cross_attn=False),
}


def objective_family(parameterization: str, cross_attn: bool) -> str:
    """The family (an `algo=` name, configs/algo/*.yaml) of a recorded objective: SUBS with
    BD3-LM's two-stream input [x_t ; x_0] is bd3lm, SUBS without it mdlm; every other
    parameterization names its own family."""
    if parameterization == "subs":
        return "bd3lm" if cross_attn else "mdlm"
    return str(parameterization)


@dataclasses.dataclass(frozen=True)
class Released:
    """A released repository: its backbone family (the `algo=` name) and the test perplexity
    on OpenWebText the paper reports for its model (Table 4, L = 1024; the diffusion values are
    upper bounds), from which the loading sanity check sets its threshold."""

    kind: str
    owt_ppl: float


# The released repositories (the no-EOS baselines included), with their model's Table 4 row
RELEASED = {
    "kuleshov-group/bd3lm-owt-block_size4": Released("bd3lm", 20.73),  # BD3-LM K = 4
    "kuleshov-group/bd3lm-owt-block_size8": Released("bd3lm", 21.68),  # BD3-LM K = 8
    "kuleshov-group/bd3lm-owt-block_size16": Released("bd3lm", 22.27),  # BD3-LM K = 16
    # stage 1, K = L = 1024: the MDLM objective, so MDLM's row
    "kuleshov-group/bd3lm-owt-block_size1024-pretrain": Released("bd3lm", 22.98),
    "kuleshov-group/mdlm-owt": Released("mdlm", 22.98),  # MDLM
    "kuleshov-group/mdlm-noeos-owt": Released("mdlm", 22.98),  # MDLM
    "kuleshov-group/sedd-noeos-owt": Released("sedd", 24.10),  # SEDD
    "kuleshov-group/ar-noeos-owt": Released("ar", 17.54),  # AR
}


def backbone_names(config: DiTConfig) -> dict[str, Tensor]:
    """Our DiT's state dict for `config`, on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return DiT(config).state_dict()


def parameter_order(config: DiTConfig) -> list[str]:
    """Our DiT's registration order of the trainable parameters (the reference's DiT registers
    the same parameters in the same order, which is how its unnamed EMA list is named)."""
    with torch.device("meta"):
        model = DiT(config)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def split_backbone(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone-level weights without the `backbone.` prefix, everything else)."""
    state = strip_prefixes(state)
    inner = {
        k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)
    }
    rest = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    return inner, rest


def infer_dit_shape(state: Mapping[str, Tensor]) -> dict:
    """What the weights alone say: vocab_size, hidden_size, n_blocks, adaln, cond_dim (or None).
    n_heads cannot be read from shapes (attn_qkv is 3D x D)."""
    if "vocab_embed.embedding" not in state:
        raise CheckpointError(
            f"no vocab_embed.embedding among the weights {_names(state)}: not a DiT checkpoint"
        )
    vocab_size, hidden = state["vocab_embed.embedding"].shape
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    adaln = "sigma_map.mlp.0.weight" in state
    cond_dim = int(state["sigma_map.mlp.0.weight"].shape[0]) if adaln else None
    return {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden),
        "n_blocks": len(blocks),
        "adaln": adaln,
        "cond_dim": cond_dim,
    }


def adapt_backbone_state(
    state: Mapping[str, Tensor],
    kind: str | BackboneKind,
    n_heads: int,
    dropout: float = 0.0,
    attn_backend: str = "sdpa",
    what: str = "checkpoint",
) -> tuple[DiTConfig, dict[str, Tensor]]:
    """Backbone-level state dict (prefix already stripped) -> (our DiTConfig, state without the
    recomputable rotary buffer), checked strictly against our DiT for that kind."""
    kind = KINDS[kind] if isinstance(kind, str) else kind
    shape = infer_dit_shape(state)
    adaln_keys = sorted(k for k in state if k.startswith("sigma_map.") or "adaLN_modulation" in k)
    if kind.adaln and not shape["adaln"]:
        raise CheckpointError(
            f"{what}: a {kind.name} backbone needs sigma_map and adaLN_modulation weights, and "
            "these have none (an AR checkpoint?)"
        )
    if not kind.adaln and adaln_keys:
        raise CheckpointError(
            f"{what}: an {kind.name} backbone has no sigma_map/adaLN_modulation weights but "
            f"found {_names(adaln_keys, 4)} (a diffusion checkpoint?)"
        )
    if shape["hidden_size"] % n_heads:
        raise CheckpointError(
            f"{what}: hidden size {shape['hidden_size']} is not divisible by n_heads={n_heads}"
        )
    config = DiTConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        cond_dim=shape["cond_dim"] or 128,
        n_blocks=shape["n_blocks"],
        n_heads=n_heads,
        dropout=dropout,
        causal=kind.causal,
        adaln=kind.adaln,
        attn_backend=attn_backend,
    )
    expected = backbone_names(config)
    strict_state_check(expected, state, what, optional=(INV_FREQ,))
    check_inv_freq(state, rotary_inv_freq(config.head_dim), INV_FREQ)
    return config, {k: v for k, v in state.items() if k != INV_FREQ}


def detect_kind(
    config: Mapping | None, state: Mapping[str, Tensor], hint: str | None = None
) -> str:
    """The backbone family of a checkpoint: a released repo name wins, then the objective the
    config names (`parameterization`: ar, sedd, or subs with or without cross-attention; our
    exports and the reference's run configs say it), then config.json's model_type and flags,
    then the keys (no adaLN -> AR)."""
    if hint is not None and hint in RELEASED:
        return RELEASED[hint].kind
    config = config or {}
    parameterization = config.get("parameterization")
    if parameterization in ("ar", "sedd", "subs"):
        return objective_family(parameterization, bool(config.get("cross_attn")))
    adaln = any(k.startswith(("sigma_map.", "backbone.sigma_map.")) for k in state)
    model_type = config.get("model_type")
    if model_type == "bd3lm":
        if config.get("causal") or not config.get("adaln", True):
            return "ar"
        if config.get("cross_attn", True):
            return "bd3lm"
        return _time_conditioned_kind(config)
    if not adaln:
        return "ar"
    return _time_conditioned_kind(config)


def _time_conditioned_kind(config: Mapping) -> str:
    """Without a parameterization, a time-conditioned model without cross-attention is read
    as SEDD (the released SEDD), with a warning: a time-conditioned MDLM reads the same."""
    if not config.get("time_conditioning"):
        return "mdlm"
    get_logger("bd3lms").warning(
        "config.json names no parameterization: time_conditioning=true without cross-attention "
        "is read as SEDD; if this is a time-conditioned MDLM, re-export it with "
        "scripts/export_hf.py (which writes parameterization)"
    )
    return "sedd"


# ----------------------------------------------------------------------------------------------
# A checkpoint in memory, before any module exists
# ----------------------------------------------------------------------------------------------
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
