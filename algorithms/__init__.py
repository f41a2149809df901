"""Training objectives as pure torch, selected by name through one registry.

`build_algorithm` is the boundary where the `algo`/`training` config nodes become typed
objects; nothing below it sees a DictConfig.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from algorithms.ar import Autoregressive
from algorithms.base import DoubleLengthCrop
from algorithms.masked_diffusion import MaskedDiffusion
from algorithms.sedd import SEDD
from algorithms.ssdlm import SSDLM
from noise_schedule import NoiseSchedule

# parameterization -> objective; bd3lm and mdlm share the SUBS objective.
PARAMETERIZATIONS = ("subs", "ar", "sedd", "ssdlm")
ALGORITHMS = ("bd3lm", "mdlm", "ar", "sedd", "ssdlm")


def build_algorithm(
    algo: Mapping[str, Any],
    training: Mapping[str, Any],
    noise: NoiseSchedule,
    mask_id: int,
    seq_len: int,
    block_size: int,
    crop: DoubleLengthCrop | None = None,
) -> MaskedDiffusion | Autoregressive | SEDD | SSDLM:
    if algo["name"] not in ALGORITHMS:
        raise ValueError(f"algo.name={algo['name']!r}: valid are {ALGORITHMS}")
    if algo["parameterization"] == "ssdlm":  # SSD-LM (docs/ssdlm.md): K = block_size
        defaults = SSDLM()
        return SSDLM(
            block_size=block_size,
            num_steps=int(algo.get("diffusion_steps") or defaults.num_steps),
            simplex_value=float(algo.get("simplex_value") or defaults.simplex_value),
            max_context=algo.get("max_context"),
            top_p=float(algo.get("top_p") or defaults.top_p),
            sample_context=str(algo.get("context") or defaults.sample_context),
        )
    if algo["parameterization"] == "ar":
        return Autoregressive(mask_id=mask_id, seq_len=seq_len, crop=crop)
    if algo["parameterization"] == "sedd":
        return SEDD(
            noise=noise,
            mask_id=mask_id,
            seq_len=seq_len,
            ignore_bos=bool(algo["ignore_bos"]),
            time_conditioning=bool(algo["time_conditioning"]),
            antithetic=bool(training["antithetic_sampling"]),
            mdlm_loss_scale=bool(algo["mdlm_loss_scale"]),
            resample=bool(training["resample"]),
            crop=crop,
        )
    if algo["parameterization"] != "subs":
        raise ValueError(
            f"algo.parameterization={algo['parameterization']!r}: valid are {PARAMETERIZATIONS}"
        )
    return MaskedDiffusion(
        noise=noise,
        mask_id=mask_id,
        seq_len=seq_len,
        block_size=block_size,
        cross_attn=bool(algo["cross_attn"]),
        ignore_bos=bool(algo["ignore_bos"]),
        time_conditioning=bool(algo["time_conditioning"]),
        antithetic=bool(training["antithetic_sampling"]),
        mdlm_loss_scale=bool(algo["mdlm_loss_scale"]),
        resample=bool(training["resample"]),
        eval_nll=bool(training["eval_nll"]),
        var_min=bool(algo["var_min"]),
        crop=crop,
    )


__all__ = ["SEDD", "SSDLM", "Autoregressive", "MaskedDiffusion", "build_algorithm"]
