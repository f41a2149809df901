"""The entries of BD3-LM and MDLM, one objective (algorithms/masked_diffusion.py): BD3-LM
trains blocks of `block_size` on the two-stream input [x_t ; x_0]; MDLM is K = L on x_t alone
(configs/algo/bd3lm.yaml, mdlm.yaml). Both sample blocks left to right (sampling/block.py)."""

from __future__ import annotations

import dataclasses
import functools

from algorithms.masked_diffusion import MaskedDiffusion
from config_keys import setting
from registry.spec import AlgoSettings, BuildContext, ClipSearch, ObjectiveSpec
from sampling.block import semi_ar_sample
from sampling.denoiser import ModelDenoiser


@dataclasses.dataclass(frozen=True)
class BD3LMSettings(AlgoSettings):
    """BD3-LM's own `algo` keys: the search of its clip interval (algo.var_min; paper Sec. 5.2,
    algorithms/clip_search.py) and the weight of the auxiliary AR loss of the clean stream."""

    clip_search_delta: float = setting(0.05, lo=0, hi=1, lo_open=True)
    clip_search_widths: tuple[float, ...] = setting((), lo=0, hi=1, lo_open=True)
    clip_search_batches: int = setting(100, lo=1)  # validation batches per interval
    fix_clipping: bool = False
    ar_loss_weight: float = setting(0.0, lo=0)  # 0: no auxiliary AR loss

    def clip_search(self) -> ClipSearch:
        return ClipSearch(
            self.clip_search_delta,
            self.clip_search_widths,
            self.clip_search_batches,
            self.fix_clipping,
        )


def build(settings: AlgoSettings, context: BuildContext) -> MaskedDiffusion:
    return MaskedDiffusion(
        noise=context.noise,
        mask_id=context.mask_id,
        seq_len=context.seq_len,
        block_size=context.block_size,
        cross_attn=settings.cross_attn,
        ignore_bos=settings.ignore_bos,
        time_conditioning=settings.time_conditioning,
        antithetic=context.antithetic,
        mdlm_loss_scale=settings.mdlm_loss_scale,
        resample=context.resample,
        eval_nll=context.eval_nll,
        var_min=settings.var_min,
        crop=context.crop,
    )


def build_bd3lm(settings: BD3LMSettings, context: BuildContext) -> MaskedDiffusion:
    """`build`, with BD3-LM's auxiliary AR loss of the clean stream."""
    return dataclasses.replace(build(settings, context), ar_loss_weight=settings.ar_loss_weight)


def block_size(settings: AlgoSettings, context: int) -> int | None:
    """Without the two-stream input the x_0 half is never attended: one block of the whole
    context (MDLM); with it, `block_size` is BD3-LM's parameter."""
    return None if settings.cross_attn else context


def sampler(objective, backbone, network, window: int, reencode: bool):
    return functools.partial(
        semi_ar_sample, ModelDenoiser(backbone, objective, window, reencode, network)
    )


def family(settings: AlgoSettings) -> str:
    return "bd3lm" if settings.cross_attn else "mdlm"


BD3LM = ObjectiveSpec(
    name="bd3lm",
    parameterization="subs",
    label="a BD3-LM model",
    settings=BD3LMSettings,
    build=build_bd3lm,
    block_size=block_size,
    fixed_k_reason="denoises its whole context as one block without algo.cross_attn",
    backbones=("dit", "hf_causal"),
    sampler=sampler,
    family_of=family,
)
MDLM = ObjectiveSpec(
    name="mdlm",
    parameterization="subs",
    label="an MDLM model",
    settings=AlgoSettings,
    build=build,
    block_size=block_size,
    fixed_k_reason="denoises its whole context as one block",
    backbones=("dit", "hf_causal"),
    sampler=sampler,
    family_of=family,
)
