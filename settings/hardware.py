"""The machine a run uses and its batch arithmetic: `resolve_hardware` (accelerator, devices,
precision, with the reason `trainer.precision=auto` chose one) and `plan_batches` (per-device
batch sizes and gradient accumulation from the global batch size)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from utils import UserError

if TYPE_CHECKING:
    from settings.groups import LoaderSettings, RunSettings, TrainerSettings


@dataclasses.dataclass(frozen=True)
class Hardware:
    accelerator: str  # "cpu" | "gpu"
    devices: int  # per node
    num_nodes: int
    precision: str
    precision_choice: str | None = None  # why `trainer.precision=auto` chose it (None: set)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


PRECISIONS = {  # accepted values -> Lightning's names
    "auto": "auto",
    "bf16-true": "bf16-true",
    "16-true": "16-true",
    "64-true": "64-true",
    "64": "64-true",
    "32-true": "32-true",
    "32": "32-true",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
}


def auto_precision(accelerator: str, released_checkpoint: bool) -> tuple[str, str]:
    """`trainer.precision=auto` -> (precision, why). CPU: float32. GPU: bf16-mixed where the
    card computes bf16 natively (Ampere and newer), else 16-mixed. Evaluating a released HF
    checkpoint (or `algo.backbone=hf_dit`): float32, the precision of the paper's likelihoods
    and samples."""
    if accelerator == "cpu":
        return "32-true", "CPU"
    if released_checkpoint:
        return "32-true", "a released checkpoint is evaluated in float32, as in the paper"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed", "the GPU computes bf16 natively"
    return "16-mixed", "the GPU has no native bf16"


def evaluates_released(run: RunSettings, loaded) -> bool:
    """An evaluation of a released checkpoint: an HF-format one (directory or hub id), a
    released format an objective's registry entry reads (format "network"), or any checkpoint
    with `algo.backbone=hf_dit` (the reference's switch for them)."""
    if loaded is None or run.mode not in ("ppl_eval", "sample_eval"):
        return False
    return run.algo.backbone == "hf_dit" or loaded.format in ("hf", "network")


def resolve_hardware(trainer: TrainerSettings, released_checkpoint: bool = False) -> Hardware:
    """`auto` values: CUDA when available (all visible GPUs), else 1 CPU; the precision as
    `auto_precision` picks it (the reason in `precision_choice`, which main.run logs). The
    values' types and choices were checked by the settings schema."""
    cuda = torch.cuda.is_available()
    accelerator = {"auto": "gpu" if cuda else "cpu", "cuda": "gpu"}.get(
        trainer.accelerator, trainer.accelerator
    )
    if accelerator == "gpu" and not cuda:
        raise UserError("trainer.accelerator=gpu but no CUDA device is visible; use auto or cpu")
    devices = trainer.devices
    if devices == "auto":
        devices = torch.cuda.device_count() if accelerator == "gpu" else 1
    precision = PRECISIONS[trainer.precision]
    why = None
    if precision == "auto":
        precision, why = auto_precision(accelerator, released_checkpoint)
    if precision == "16-mixed" and accelerator == "cpu":
        raise UserError(
            "trainer.precision=16-mixed needs a GPU (no float16 autocast training on CPU); "
            "use bf16-mixed or 32-true"
        )
    return Hardware(accelerator, devices, trainer.num_nodes, precision, why)


def configure_float32_matmul(trainer: TrainerSettings) -> None:
    """`trainer.float32_matmul_precision`: highest (exact float32 matmuls, torch's default),
    high (TF32 tensor cores on Ampere and newer) or medium (bf16); float32 work only."""
    torch.set_float32_matmul_precision(trainer.float32_matmul_precision)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # per device, per micro-batch
    eval_batch_size: int  # per device
    accumulate: int  # micro-batches per optimizer step


def plan_batches(
    loader: LoaderSettings, world_size: int, accumulate: int | None = None
) -> BatchPlan:
    """global_batch_size = batch_size x devices x nodes x accumulation, exactly.

    A null per-device size is ceil(global / world_size) (the evaluation one must split exactly);
    `accumulate` (if given) must agree.
    """
    global_bs, eval_global = loader.global_batch_size, loader.eval_global_batch_size
    batch_size = loader.batch_size or math.ceil(global_bs / world_size)
    per_step = batch_size * world_size
    if global_bs % per_step:
        raise UserError(
            f"loader.global_batch_size={global_bs} is not a multiple of loader.batch_size "
            f"x devices x nodes = {batch_size} x {world_size}; choose sizes that divide it"
        )
    if loader.eval_batch_size is None and eval_global % world_size:
        raise UserError(
            f"loader.eval_global_batch_size={eval_global} does not split over {world_size} "
            "processes (evaluation numbers would depend on the process count); choose a "
            "multiple of the device count or set loader.eval_batch_size"
        )
    eval_batch_size = loader.eval_batch_size or eval_global // world_size
    derived = global_bs // per_step
    if accumulate is not None and accumulate != derived:
        raise UserError(
            f"trainer.accumulate_grad_batches={accumulate} disagrees with loader.global_batch_size"
            f"={global_bs} / ({batch_size} x {world_size}) = {derived}; leave it null"
        )
    return BatchPlan(batch_size, eval_batch_size, derived)
