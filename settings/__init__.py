"""The settings boundary: the composed config is checked here once, before anything is written,
and becomes typed, frozen settings that the run reads instead of the config.

  groups.py    the typed settings: one frozen dataclass per config group (RunSettings: all)
  schema.py    the schema derived from them (type, range, choices, unknown keys); `typed`
  checks.py    rules across keys: the objective's network and capabilities, strategy, trainer
  sampling.py  sample_eval's rules: the sampler's options, prompts, the trained window
  hardware.py  accelerator, devices and precision; batch arithmetic
  paths.py     directories a run writes or creates, wandb's credentials
  resume.py    the keys a resumed run cannot change

`check(cfg)` checks the schema and every rule that needs no objective (checks.check_config)
and returns the typed settings with the run's Hardware and BatchPlan; `check_objective` the
rules on the objective built from them (`build_objective`), `check_sampler` sample_eval's once
the trained window of the checkpoint is known (after `settle_block_size` for it).
`validate(cfg)` runs them all on an objective built for the checks alone (what tests and
scripts call; main.prepare builds the run's objective once and checks it). `load(cfg)` is the
typed settings alone (the schema checked).
"""

from __future__ import annotations

from collections.abc import Collection

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from settings.checks import (
    build_objective,
    check_config,
    check_objective,
    check_pretrained_source,
    objective_spec,
    settle_block_size,
    settle_tokenizer,
    text8_crop,
)
from settings.groups import RunSettings
from settings.hardware import (
    BatchPlan,
    Hardware,
    auto_precision,
    configure_float32_matmul,
    evaluates_released,
    plan_batches,
    resolve_hardware,
)
from settings.paths import check_writable
from settings.resume import check_resume_config
from settings.sampling import check_sampler, sampling_options
from settings.schema import check_schema, typed
from utils import UserError


def load(cfg: DictConfig) -> RunSettings:
    """The typed settings of the composed config `cfg` (resolved; the schema checked); no
    rule across keys is checked."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"the config does not resolve: {str(err).splitlines()[0]}") from None
    check_schema(resolved)
    return typed(resolved)


def check(
    cfg: DictConfig, hw: Hardware | None = None, command_line: Collection[str] = ()
) -> tuple[RunSettings, Hardware, BatchPlan]:
    """The typed settings of `cfg`, the machine (`hw`, default: this one) and the batch plan,
    after the schema and every rule that needs no objective (check_config). Writes nothing;
    sets `block_size` in `cfg` to the K the objective uses (settle_block_size; sample_eval's
    once the trained window is known) and data.tokenizer_name_or_path to the tokenizer a
    pretrained backbone brings (settle_tokenizer). command_line: the keys the command line
    sets."""
    run = settle_tokenizer(cfg, load(cfg), command_line)
    if run.mode != "sample_eval":
        run = settle_block_size(cfg, run, run.model.length, "model.length", command_line)
    hw = hw or resolve_hardware(run.trainer)
    check_config(run, hw)
    plan = plan_batches(run.loader, hw.world_size, run.trainer.accumulate_grad_batches)
    return run, hw, plan


def validate(
    cfg: DictConfig, hw: Hardware | None = None, command_line: Collection[str] = ()
) -> tuple[RunSettings, Hardware, BatchPlan]:
    """`check` and check_objective on an objective built for the checks (mask id 0; context
    model.length, sample_eval's K): UserError (one line) on the first problem."""
    run, hw, plan = check(cfg, hw, command_line)
    seq_len = run.block_size if run.mode == "sample_eval" else run.model.length
    check_objective(run, build_objective(run, seq_len), hw)
    return run, hw, plan


__all__ = [
    "BatchPlan",
    "Hardware",
    "RunSettings",
    "auto_precision",
    "build_objective",
    "check",
    "check_objective",
    "check_pretrained_source",
    "check_resume_config",
    "check_sampler",
    "check_schema",
    "check_writable",
    "configure_float32_matmul",
    "evaluates_released",
    "load",
    "objective_spec",
    "plan_batches",
    "resolve_hardware",
    "sampling_options",
    "settle_block_size",
    "text8_crop",
    "validate",
]
