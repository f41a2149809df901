"""Networks: the backbone contract and registry (models.backbone), the DiT backbone, attention
helpers and parameter EMA.

`dit_config` is the one place where a `model` config node becomes a typed `DiTConfig` (its keys
and their types were checked by the settings boundary).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.backbone import BACKBONES, Backbone, BackboneSpec, backbone_spec
from models.dit import DiT, DiTConfig


def dit_config(model_cfg: Mapping[str, Any], vocab_size: int, causal: bool) -> DiTConfig:
    """model_cfg: the `model` config group. causal: AR backbone (no adaLN unless model.adaln).
    Raises ValueError on shapes the DiT cannot take."""
    return DiTConfig(
        vocab_size=vocab_size,
        hidden_size=int(model_cfg["hidden_size"]),
        cond_dim=int(model_cfg["cond_dim"]),
        n_blocks=int(model_cfg["n_blocks"]),
        n_heads=int(model_cfg["n_heads"]),
        dropout=float(model_cfg["dropout"]),
        causal=causal,
        adaln=(not causal) or bool(model_cfg.get("adaln", False)),
        attn_backend=str(model_cfg["attn_backend"]),
    )


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "DiT",
    "DiTConfig",
    "backbone_spec",
    "dit_config",
]
