"""Networks: the DiT backbone, attention helpers and parameter EMA.

`build_backbone` is the one place where a Hydra `model` node becomes a typed `DiTConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.dit import DiT, DiTConfig

# Reference model keys that are stored but have no effect (SPEC 8.23); accepted for CLI parity.
IGNORED_MODEL_KEYS = frozenset({"type", "scale_by_sigma", "tie_word_embeddings", "length"})
MODEL_KEYS = frozenset(
    {"hidden_size", "cond_dim", "n_blocks", "n_heads", "dropout", "adaln", "attn_backend"}
)


def build_backbone(model_cfg: Mapping[str, Any], vocab_size: int, causal: bool) -> DiT:
    """model_cfg: the `model` config group. causal: AR backbone (no adaLN unless model.adaln)."""
    unknown = set(model_cfg) - MODEL_KEYS - IGNORED_MODEL_KEYS
    if unknown:
        raise ValueError(f"unknown model keys {sorted(unknown)}; valid are {sorted(MODEL_KEYS)}")
    config = DiTConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg["hidden_size"],
        cond_dim=model_cfg["cond_dim"],
        n_blocks=model_cfg["n_blocks"],
        n_heads=model_cfg["n_heads"],
        dropout=model_cfg["dropout"],
        causal=causal,
        adaln=(not causal) or bool(model_cfg.get("adaln", False)),
        attn_backend=model_cfg["attn_backend"],
    )
    return DiT(config)


__all__ = ["DiT", "DiTConfig", "build_backbone"]
