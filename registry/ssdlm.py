"""SSD-LM's entry (algorithms/ssdlm.py, models/ssdlm.py, sampling/ssdlm.py; docs/ssdlm.md;
configs/algo/ssdlm.yaml): simplex diffusion of one block given the clean tokens before it, on
its own RoBERTa network (`model.backbone=roberta`), sampled block by block; it reads the
released SSD-LM directory for evaluation."""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from algorithms.ssdlm import SSDLM
from checkpoints.layout import LoadedCheckpoint
from config_keys import setting
from registry.spec import AlgoSettings, BuildContext, ObjectiveSpec, ReleasedFormat
from sampling.ssdlm import SSDLMSamplerOptions, ssdlm_sample
from utils import UserError


@dataclasses.dataclass(frozen=True)
class SSDLMSettings(AlgoSettings):
    """SSD-LM's own `algo` keys; None takes algorithms.ssdlm.SSDLM's default."""

    diffusion_steps: int | None = setting(None, lo=1)  # T of the training forward process (5000)
    simplex_value: float | None = setting(None, lo=0, lo_open=True)  # k of the +-k simplex (5)
    top_p: float | None = setting(None, lo=0, hi=1, lo_open=True)  # the sampling nucleus (0.95)
    context: Literal["previous_block", "all"] | None = None  # the sampler's context
    max_context: int | None = setting(None, lo=1)  # context tokens at most (train and sample)


def build(settings: SSDLMSettings, context: BuildContext) -> SSDLM:
    defaults = SSDLM()
    return SSDLM(
        block_size=context.block_size,
        num_steps=settings.diffusion_steps or defaults.num_steps,
        simplex_value=settings.simplex_value or defaults.simplex_value,
        max_context=settings.max_context,
        top_p=settings.top_p or defaults.top_p,
        sample_context=settings.context or defaults.sample_context,
        seq_len=context.seq_len,
    )


def sampler(objective: SSDLM, backbone, network, window: int, reencode: bool):
    """The network is SSD-LM's own (the objective's `backbone`); its sampling_blocks give
    stride K, so the trained window does not constrain the tiling."""
    options = SSDLMSamplerOptions(
        simplex_value=objective.simplex_value,
        top_p=objective.top_p,
        context=objective.sample_context,
        max_context=objective.max_context,
    )
    return functools.partial(ssdlm_sample, network or backbone, options=options)


# models.ssdlm imports transformers: imported on use, so that the registry stays torch-only
# (the GPU acceptance script's machine has torch alone)
def is_released(path: str) -> bool:
    """`path` is a released SSD-LM directory (models.ssdlm.is_released_layout)."""
    from models.ssdlm import is_released_layout

    return is_released_layout(path)


def read_released(path: str, key: str) -> LoadedCheckpoint:
    """A released SSD-LM directory (models.ssdlm: a RoBERTa MLM + its two layer files, read
    with weights_only) as format "network" (the network built in raw["network"])."""
    from models import ssdlm as network_files

    try:
        vocab_size, max_tokens = network_files.released_shape(path)
        network = network_files.load_ssdlm(path)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{key}={path}: {reason[:200]}") from None
    meta = {"model_length": max_tokens, "vocab_size": vocab_size, "family": "ssdlm"}
    return LoadedCheckpoint(source=path, format="network", raw={"network": network}, meta=meta)


def check(cfg, objective: SSDLM) -> None:
    """What the RoBERTa network cannot do: another attention backend, compiled DiT blocks,
    fine-tuning from another checkpoint."""
    name = cfg.algo.name
    if cfg.model.attn_backend != "sdpa":
        raise UserError(
            f"model.attn_backend={cfg.model.attn_backend}: the RoBERTa network of "
            f"algo={name} uses transformers' attention; set model.attn_backend=sdpa"
        )
    if cfg.training.compile:
        raise UserError(
            f"training.compile=true compiles DiT blocks; algo={name} has none, set "
            "training.compile=false"
        )
    if cfg.mode == "train" and cfg.training.from_pretrained:
        raise UserError(
            f"training.from_pretrained={cfg.training.from_pretrained}: algo={name} trains "
            "from scratch or resumes its own run (checkpointing.resume_ckpt_path); set null"
        )


ENTRY = ObjectiveSpec(
    name="ssdlm",
    parameterization="ssdlm",
    label="an SSD-LM model",
    settings=SSDLMSettings,
    build=build,
    block_size=lambda settings, context: None,
    backbones=("roberta",),
    sampler=sampler,
    released=ReleasedFormat(
        describe="an SSD-LM checkpoint (embed_sum_layer.pt, timestep_layer.pt)",
        matches=is_released,
        read=read_released,
    ),
    check=check,
)
