"""The records of the objective registry: `ObjectiveSpec` (one per objective), the `algo`
settings every objective reads (`AlgoSettings`, extended per objective; settings/ derives the
group's schema from them) and `BuildContext`, what a run knows besides the settings when it
builds an objective."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from algorithms.base import DoubleLengthCrop
from config_keys import setting
from noise_schedule import NoiseSchedule

if TYPE_CHECKING:
    from algorithms.base import Objective


@dataclasses.dataclass(frozen=True)
class ClipSearch:
    """BD3-LM's search of the clip interval (with algo.var_min): every interval of the grid
    (algorithms.clip_search.interval_grid of `widths`, step `delta`) is measured on
    `batches` validation batches, and the one of least variance is trained on unless
    `fix_clipping`."""

    delta: float
    widths: tuple[float, ...]
    batches: int
    fix_clipping: bool


@dataclasses.dataclass(frozen=True)
class AlgoSettings:
    """The `algo` group's keys every objective has (configs/algo/*.yaml; config_keys says how
    a field declares a key). An objective whose entry needs more extends it (BD3-LM's
    registry/masked_diffusion.py, SSD-LM's registry/ssdlm.py)."""

    name: str
    # hf_dit: evaluating a released HF checkpoint (float32 unless trainer.precision says)
    backbone: Literal["dit", "hf_dit"] | None = "dit"
    parameterization: str = setting("subs", choices=lambda: parameterizations())  # recorded
    time_conditioning: bool = False
    T: int = setting(0, lo=0)  # sampling steps
    ignore_bos: bool = False
    cross_attn: bool = False
    var_min: bool = False  # train on the clip interval [eps_min, eps_max] (learned by BD3-LM)
    mdlm_loss_scale: bool = False

    def clip_search(self) -> ClipSearch | None:
        """The clip-interval search these settings ask for (None: none; BD3-LM's settings
        have one)."""
        return None


def parameterizations() -> tuple[str, ...]:
    """The `algo.parameterization` values of the registered objectives (each entry's own is
    checked against its `parameterization` by settings)."""
    from registry import OBJECTIVES  # the registry's entries import this module

    return tuple(dict.fromkeys(spec.parameterization for spec in OBJECTIVES.values()))


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What building an objective needs besides its settings: the noise schedule, the mask
    id, the context L, the K the run uses (settled: registry.block_size_of), the `training`
    flags objectives read, and the text8-crop step for 2L training rows (or None)."""

    noise: NoiseSchedule
    mask_id: int
    seq_len: int
    block_size: int
    antithetic: bool = True
    resample: bool = False
    eval_nll: bool = True
    crop: DoubleLengthCrop | None = None


@dataclasses.dataclass(frozen=True)
class ReleasedFormat:
    """A released checkpoint format that one objective reads (SSD-LM's directory): `matches`
    (path) -> whether a path is one, cheaply; `read(path, key)` -> a
    checkpoints.LoadedCheckpoint of format "network" (meta: model_length, vocab_size,
    family), UserError on a bad file; `describe`: how messages name it."""

    describe: str
    matches: Callable[[str], bool]
    read: Callable[[str, str], Any]


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """One objective's record (see registry/__init__.py)."""

    name: str
    label: str
    parameterization: str  # what checkpoints record of it (algo.parameterization)
    settings: type[AlgoSettings]
    build: Callable[[AlgoSettings, BuildContext], Objective]
    block_size: Callable[[AlgoSettings, int], int | None]
    backbones: tuple[str, ...]
    sampler: Callable[..., Callable]
    causal: bool = False
    fixed_k_reason: str = "fixes its block size"  # "predicts one token at a time"
    released: ReleasedFormat | None = None
    check: Callable[[Any, Objective], None] | None = None
    family_of: Callable[[AlgoSettings], str] | None = None

    def family(self, settings: AlgoSettings) -> str:
        """The checkpoint family (an `algo=` name) these settings train: `family_of`'s answer
        (BD3-LM without its two-stream input trains MDLM), else the entry's name."""
        return self.family_of(settings) if self.family_of is not None else self.name
