"""HF-compatible models for the released checkpoints.

`from hf import BD3LM, BD3LMConfig, MDLM, MDLMConfig`: drop-in replacements for the
released checkpoints' own classes that wrap our `models.dit.DiT` (never a copy of it). See
`modeling` for the forward contract; the checkpoint layouts they read are in `checkpoints.layout`.
"""

from __future__ import annotations

from hf.configuration import BD3LMConfig, MDLMConfig
from hf.generation import DiffusionGenerateOutput
from hf.modeling import BD3LM, MDLM


def register_auto_classes() -> None:
    """Register our model types ("bd3lm", "mdlm") with transformers' AutoConfig and
    AutoModelForMaskedLM, so `AutoModelForMaskedLM.from_pretrained(DIR)` loads our classes
    without remote code. Idempotent; run when this package is imported."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    for config_class, model_class in ((BD3LMConfig, BD3LM), (MDLMConfig, MDLM)):
        try:
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModelForMaskedLM.register(config_class, model_class, exist_ok=True)
        except ValueError:  # another class already holds the name: leave it
            pass


register_auto_classes()

__all__ = [
    "BD3LM",
    "BD3LMConfig",
    "DiffusionGenerateOutput",
    "MDLM",
    "MDLMConfig",
    "register_auto_classes",
]
