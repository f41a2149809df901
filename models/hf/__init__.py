"""HF-compatible models for the released checkpoints.

`from models.hf import BD3LM, BD3LMConfig, MDLM, MDLMConfig`: drop-in replacements for the
released checkpoints' own classes that wrap our `models.dit.DiT` (never a copy of it). See
`modeling` for the forward contract; the checkpoint layouts they read are in `checkpoints.layout`.
"""

from __future__ import annotations

from models.hf.configuration import BD3LMConfig, MDLMConfig
from models.hf.modeling import BD3LM, MDLM

__all__ = [
    "BD3LM",
    "BD3LMConfig",
    "MDLM",
    "MDLMConfig",
]
