"""One registered record per objective (torchtitan's `TrainSpec` pattern): everything the run
needs to know about an objective besides its maths, so that nothing outside `algorithms/` and
this package dispatches on an objective's name or type.

An entry (`ObjectiveSpec`, one module per objective in this package) holds:
  name, label     the `algo=` name (configs/algo/NAME.yaml) and how messages name its models
  parameterization  what checkpoints record of it (ar | subs | sedd | ssdlm)
  settings        its `algo` settings: a frozen dataclass whose fields are the group's keys
  build           settings + BuildContext -> the objective (an algorithms.base.Objective)
  block_size      the K it fixes for a context of L tokens (AR: 1; MDLM, SEDD: L), or None
                  where `block_size` is its own parameter (BD3-LM, SSD-LM)
  backbones       the `model.backbone` values it runs on; `causal`: its DiT is token-causal
  sampler         objective, backbone, network, window, reencode -> sample_fn
  released        a released checkpoint format only it reads (SSD-LM's directory), or None
  check           its own cross-key rules on the composed config, or None

Adding an objective: its module under algorithms/ (the maths, an `Objective`), a module here
with its settings and entry (added to OBJECTIVES below), and configs/algo/NAME.yaml.
Torch only (no Lightning, Hydra or OmegaConf): settings/, main.py, hf/ and the benchmarks
all read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from algorithms.base import DoubleLengthCrop
from checkpoints import LoadedCheckpoint, check_backbone, read_any_checkpoint
from config_keys import from_mapping
from noise_schedule import NoiseSchedule
from registry import ar, masked_diffusion, sedd, ssdlm
from registry.spec import AlgoSettings, BuildContext, ObjectiveSpec, ReleasedFormat
from sampling import SampleFn, SamplerConfig, TokenIds, sampler_config
from utils import UserError

OBJECTIVES: dict[str, ObjectiveSpec] = {
    spec.name: spec
    for spec in (
        masked_diffusion.BD3LM, masked_diffusion.MDLM, ar.ENTRY, sedd.ENTRY, ssdlm.ENTRY
    )
}  # fmt: skip


def objective_spec(name: str) -> ObjectiveSpec:
    """The entry of `algo=name`; ValueError naming the valid ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"algo.name={name!r}: valid are {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def algo_settings(algo: AlgoSettings | Mapping[str, Any]) -> tuple[ObjectiveSpec, AlgoSettings]:
    """The entry and the typed settings of `algo`: settings already typed (settings.load), or
    an `algo` config node / plain mapping (checkpoint configs, HF configs, benchmarks)."""
    if isinstance(algo, AlgoSettings):
        return objective_spec(algo.name), algo
    spec = objective_spec(str(algo["name"]))
    return spec, from_mapping(spec.settings, algo)


def block_size_of(algo: AlgoSettings | Mapping[str, Any], context: int, given: int) -> int:
    """The K the objective of `algo` uses for a context of `context` tokens: its own
    (`ObjectiveSpec.block_size`) or, where K is its parameter, `given`."""
    spec, settings = algo_settings(algo)
    fixed = spec.block_size(settings, context)
    return given if fixed is None else fixed


def build_objective(
    algo: AlgoSettings | Mapping[str, Any],
    training: Any,
    noise: NoiseSchedule,
    mask_id: int,
    seq_len: int,
    block_size: int,
    crop: DoubleLengthCrop | None = None,
):
    """The objective of `algo` (typed settings or a mapping, `algo_settings`) and the
    `training` flags it reads (antithetic_sampling, resample, eval_nll: typed training
    settings or a mapping) for a context of `seq_len` tokens: `block_size` is used where K is
    the objective's parameter, its own K otherwise (`block_size_of`). ValueError on values the
    objective refuses."""
    spec, settings = algo_settings(algo)

    def flag(name: str) -> bool:
        return training[name] if isinstance(training, Mapping) else getattr(training, name)

    fixed = spec.block_size(settings, seq_len)
    context = BuildContext(
        noise=noise,
        mask_id=mask_id,
        seq_len=seq_len,
        block_size=block_size if fixed is None else fixed,
        antithetic=flag("antithetic_sampling"),
        resample=flag("resample"),
        eval_nll=flag("eval_nll"),
        crop=crop,
    )
    return spec.build(settings, context)


def build_sampler(
    spec: ObjectiveSpec,
    objective,
    backbone,
    window: int,
    length: int,
    ids: TokenIds,
    options: dict,
    reencode: bool = False,
    network=None,
) -> tuple[SamplerConfig, SampleFn]:
    """The sampler of `objective` (its entry's `sampler`) and its config
    (sampling.sampler_config: the objective's blocks, `options` the rest). network: the
    callable the objective calls (models.network.BackboneNetwork over `backbone` when None).
    Raises ValueError on settings the sampler cannot honour."""
    cfg = sampler_config(objective, window, length, ids, options)
    return cfg, spec.sampler(objective, backbone, network, window, reencode)


def read_for_eval(
    spec: ObjectiveSpec, path: str, key: str, n_heads: int | None, backbone: str
) -> LoadedCheckpoint:
    """`eval.checkpoint_path` read before any module exists, for a run of `spec` on
    `model.backbone` `backbone`: a released format of its own entry's (`spec.released`), one of
    another objective's refused in one line naming it, else what
    checkpoints.read_any_checkpoint reads, whose network must be the run's backbone."""
    for other in OBJECTIVES.values():
        released = other.released
        if released is None or not released.matches(path):
            continue
        if other.name != spec.name:
            raise UserError(
                f"{key}={path} is {released.describe}; sample it with algo={other.name}"
            )
        return released.read(path, key)
    loaded = read_any_checkpoint(path, key, n_heads)
    check_backbone(loaded, backbone, key, f"algo={spec.name}")
    return loaded


__all__ = [
    "OBJECTIVES",
    "AlgoSettings",
    "BuildContext",
    "ObjectiveSpec",
    "ReleasedFormat",
    "algo_settings",
    "block_size_of",
    "build_objective",
    "build_sampler",
    "objective_spec",
    "read_for_eval",
]
