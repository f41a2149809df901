"""HF configs with the fields and class defaults of the released checkpoints' own classes
, so that config.json files written by either side load on the other."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

BD3LM_AUTO_MAP = {
    "AutoConfig": "configuration_bd3lm.BD3LMConfig",
    "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM",
}
MDLM_AUTO_MAP = {
    "AutoConfig": "configuration_mdlm.MDLMConfig",
    "AutoModelForMaskedLM": "modeling_mdlm.MDLM",
}


class BD3LMConfig(PretrainedConfig):
    """Fields and defaults of the reference's `BD3LMConfig` (note cond_dim 129 and
    sampling_eps_max 0.999 are the class defaults; the released OWT configs say 128 / 0.999)."""

    model_type = "bd3lm"
    FIELDS = (
        "block_size",
        "vocab_size",
        "model_length",
        "cross_attn",
        "adaln",
        "attn_backend",
        "causal",
        "hidden_dim",
        "cond_dim",
        "n_blocks",
        "n_heads",
        "dropout",
        "time_conditioning",
        "var_min",
        "sampling_eps_min",
        "sampling_eps_max",
    )

    def __init__(
        self,
        block_size: int = 1,
        vocab_size: int = 50258,
        model_length: int = 1024,
        cross_attn: bool = True,
        adaln: bool = True,
        attn_backend: str = "flex",
        causal: bool = False,
        hidden_dim: int = 768,
        cond_dim: int = 129,
        n_blocks: int = 12,
        n_heads: int = 12,
        dropout: float = 0.1,
        time_conditioning: bool = False,
        var_min: bool = True,
        sampling_eps_min: float = 1e-3,
        sampling_eps_max: float = 0.999,
        **kwargs,
    ):
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.cross_attn = cross_attn
        self.adaln = adaln
        self.attn_backend = attn_backend
        self.causal = causal
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.var_min = var_min
        self.sampling_eps_min = sampling_eps_min
        self.sampling_eps_max = sampling_eps_max
        kwargs.setdefault("auto_map", dict(BD3LM_AUTO_MAP))
        super().__init__(**kwargs)


class MDLMConfig(PretrainedConfig):
    """Fields and defaults of the reference's `MDLMConfig` (`kuleshov-group/mdlm-owt` and the
    no-EOS baselines). The reference has no attention-backend field: ours reads an optional
    `attn_backend` attribute (default sdpa) that only a load override sets."""

    model_type = "mdlm"
    FIELDS = (
        "vocab_size",
        "model_length",
        "hidden_dim",
        "cond_dim",
        "n_blocks",
        "n_heads",
        "dropout",
        "time_conditioning",
    )

    def __init__(
        self,
        vocab_size: int = 50258,
        model_length: int = 1024,
        hidden_dim: int = 768,
        cond_dim: int = 129,
        n_blocks: int = 12,
        n_heads: int = 12,
        dropout: float = 0.1,
        time_conditioning: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        kwargs.setdefault("auto_map", dict(MDLM_AUTO_MAP))
        super().__init__(**kwargs)


# from_pretrained's dtype / device_map arguments
def resolve_dtype(dtype: Any):
    """None, "auto", a torch.dtype or its name -> None, "auto" or a torch.dtype."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(
            f"dtype={dtype!r}: give a torch dtype, its name (float32, bfloat16, float16) or 'auto'"
        )
    return resolved


def resolve_device(device_map: Any) -> torch.device | None:
    """None, "auto" or one device (string, index or torch.device) -> a torch.device."""
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, (str, int, torch.device)):
        try:
            return torch.device(device_map)
        except (RuntimeError, TypeError):
            pass
    raise ValueError(
        f"device_map={device_map!r}: give 'auto' or one device ('cpu', 'cuda:0'); "
        "these models are not sharded across devices"
    )
