"""HF-compatible models for the released checkpoints, and the loaders behind them.

`from models.hf import BD3LM, BD3LMConfig, MDLM, MDLMConfig`: drop-in replacements for the
released checkpoints' own classes that wrap our `models.dit.DiT` (never a copy of it). See
`modeling` for the forward contract and `loading` for strict key checks and the keyed adapter
of the no-EOS baselines (MDLM, SEDD, AR).
"""

from __future__ import annotations

from models.hf.configuration import BD3LMConfig, MDLMConfig
from models.hf.loading import (
    KINDS,
    RELEASED,
    BackboneKind,
    CheckpointError,
    adapt_backbone_state,
    detect_kind,
    read_hf_directory,
    resolve_pretrained,
)
from models.hf.modeling import BD3LM, MDLM

MODEL_CLASSES = {"bd3lm": BD3LM, "mdlm": MDLM}


def auto_model_class(model_type: str | None):
    """config.json's model_type -> our class (what AutoModelForMaskedLM + auto_map did)."""
    if model_type not in MODEL_CLASSES:
        raise CheckpointError(
            f"model_type={model_type!r}: valid are {sorted(MODEL_CLASSES)} (no remote code)"
        )
    return MODEL_CLASSES[model_type]


__all__ = [
    "BD3LM",
    "BD3LMConfig",
    "KINDS",
    "MDLM",
    "MDLMConfig",
    "MODEL_CLASSES",
    "RELEASED",
    "BackboneKind",
    "CheckpointError",
    "adapt_backbone_state",
    "auto_model_class",
    "detect_kind",
    "read_hf_directory",
    "resolve_pretrained",
]
