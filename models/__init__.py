"""Networks: the backbone contract and registry (models.backbone), the DiT backbone, attention
helpers and parameter EMA.

`dit_config` is the one place where the `model` group becomes a typed `DiTConfig` (its keys, their
types and ranges checked by the settings boundary, settings.groups.DiTSettings).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.backbone import BACKBONES, Backbone, BackboneSpec, backbone_spec
from models.dit import DiT, DiTConfig


def dit_config(model: Mapping[str, Any], vocab_size: int, causal: bool) -> DiTConfig:
    """model: the `model` group's keys (settings.groups.DiTSettings as a mapping, the backbone
    registry's argument). causal: AR backbone (no adaLN unless model.adaln). Raises ValueError
    on shapes the DiT cannot take."""
    return DiTConfig(
        vocab_size=vocab_size,
        hidden_size=model["hidden_size"],
        cond_dim=model["cond_dim"],
        n_blocks=model["n_blocks"],
        n_heads=model["n_heads"],
        dropout=model["dropout"],
        causal=causal,
        adaln=(not causal) or model["adaln"],
        attn_backend=model["attn_backend"],
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
