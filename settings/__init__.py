"""The settings boundary: the composed config is checked here once, before anything is written.

  schema.py    every key a user can set: type, range, choices; unknown keys fail
  checks.py    rules across keys: the objective's capabilities, backends, strategy, paths
  hardware.py  accelerator, devices and precision; batch arithmetic

`validate(cfg)` runs all of it and returns the run's Hardware and BatchPlan; `check_sampling`
adds the sampler's rules once the trained window of the checkpoint is known, and
`check_resume_config` the keys a resumed run cannot change.
"""

from __future__ import annotations

from collections.abc import Collection

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from settings.checks import (
    build_objective,
    check_resume_config,
    check_run,
    check_sampling,
    check_writable,
    objective_spec,
    sampling_options,
    settle_block_size,
)
from settings.hardware import (
    BatchPlan,
    Hardware,
    auto_precision,
    configure_float32_matmul,
    evaluates_released,
    plan_batches,
    resolve_hardware,
)
from settings.schema import check_schema
from utils import UserError


def validate(
    cfg: DictConfig, hw: Hardware | None = None, command_line: Collection[str] = ()
) -> tuple[Hardware, BatchPlan]:
    """Check every key of `cfg` and the rules between them; UserError (one line) on the first
    problem. Writes nothing; sets `block_size` to the K the objective uses (settle_block_size:
    sample_eval's in check_sampling, once the trained window is known). hw: the machine to
    check against (default: this one); command_line: the keys the command line sets."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"the config does not resolve: {str(err).splitlines()[0]}") from None
    check_schema(resolved)
    if cfg.mode != "sample_eval":
        settle_block_size(cfg, int(cfg.model.length), "model.length", command_line)
    hw = hw or resolve_hardware(cfg.trainer)
    check_run(cfg, hw)
    plan = plan_batches(cfg.loader, hw.world_size, cfg.trainer.accumulate_grad_batches)
    return hw, plan


__all__ = [
    "BatchPlan",
    "Hardware",
    "auto_precision",
    "build_objective",
    "check_resume_config",
    "check_sampling",
    "check_schema",
    "check_writable",
    "configure_float32_matmul",
    "evaluates_released",
    "objective_spec",
    "plan_batches",
    "resolve_hardware",
    "sampling_options",
    "settle_block_size",
    "validate",
]
