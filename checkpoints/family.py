"""The objective family of a checkpoint and of a run, and the evaluation check between them.

A family is an `algo=` name (configs/algo/*.yaml). Evaluation and sampling require the
checkpoint's family to train the run's objective (`check_family`); BD3-LM with one block
(K = L) trains MDLM's objective, so the two evaluate each other. Fine-tuning across families
(MDLM pre-training -> BD3-LM, the paper's recipe) does not come here
(checkpoints.load.load_checkpoint_into).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from checkpoints.layout import LoadedCheckpoint, objective_family
from utils import UserError, get_logger

if TYPE_CHECKING:
    from diffusion import Diffusion

log = get_logger("bd3lms")


@dataclasses.dataclass(frozen=True)
class Family:
    """The objective family of a checkpoint or a run (an `algo=` name; None: the
    checkpoint does not record it) with the block size K and length L that decide whether a
    BD3-LM trains MDLM's objective."""

    name: str | None
    block_size: int | None = None
    length: int | None = None

    @property
    def one_block(self) -> bool:
        """BD3-LM with K = L (the length known)."""
        return self.name == "bd3lm" and self.length is not None and self.block_size == self.length

    @property
    def objective(self) -> str | None:
        """The family whose objective this one trains: BD3-LM with one block (K = L) trains
        MDLM's (algorithms.masked_diffusion: the x_0 half is never attended; the same NELBO on
        the same t and x_t), so such a checkpoint evaluates as MDLM, and an MDLM checkpoint in a
        K = L BD3-LM run. Every other family only its own."""
        return "mdlm" if self.one_block else self.name

    def describe(self, length_name: str) -> str:
        what = {
            "ar": "an AR (causal, no adaLN) model",
            "mdlm": "an MDLM model",
            "sedd": "a SEDD model",
            "bd3lm": "a BD3-LM model",
        }.get(self.name, f"a model of the {self.name} family")
        if self.one_block:
            what += f" with block_size {self.block_size} = {length_name}, the MDLM objective"
        elif self.name == "bd3lm" and self.block_size is not None:
            what += f" with block_size {self.block_size}"
        return f"{what} (family {self.name})"

    def algo(self) -> str:
        """The overrides of a run that evaluates this checkpoint."""
        if self.objective == "bd3lm" and self.block_size is not None:
            return f"algo=bd3lm block_size={self.block_size}"
        return f"algo={self.objective}"


def run_family(module: Diffusion) -> Family:
    """The family of the module's objective: `module.family` (its registry entry's answer for
    the run's settings), with the objective's K and L where it has blocks."""
    algorithm = module.algorithm
    return Family(module.family, algorithm.block_size, algorithm.seq_len)


def checkpoint_family(loaded: LoadedCheckpoint, key: str) -> Family:
    """The family a checkpoint records: our .ckpt's stored run config (algo.parameterization,
    algo.cross_attn, block_size, model.length), an HF directory's config.json (detect_kind), the
    reference's pickled run config (its parameterization; without one only AR is certain, from
    its keys: nothing else lacks adaLN)."""
    if loaded.format == "network":  # a released format its objective's entry read
        return Family(loaded.meta["family"])
    if loaded.format == "ours":
        config = loaded.raw.get("config") or {}
        algo = config.get("algo") or {}
        length = (config.get("model") or {}).get("length")
        if "parameterization" not in algo:
            return Family(None)
        name = objective_family(algo["parameterization"], bool(algo.get("cross_attn")))
        return Family(name, config.get("block_size"), length)
    meta = loaded.meta
    stated = loaded.format == "hf" or "parameterization" in meta or loaded.kind == "ar"
    return Family(loaded.kind if stated else None, meta.get("block_size"), meta.get("model_length"))


def check_family(module: Diffusion, loaded: LoadedCheckpoint, key: str) -> None:
    """Evaluation and sampling: one UserError line unless the checkpoint's family trains this
    run's objective (Family.objective), naming both families and the `algo=` to use. Fine-tuning
    across families (MDLM pre-training -> BD3-LM, the paper's recipe) does not come here."""
    run, ckpt = run_family(module), checkpoint_family(loaded, key)
    if ckpt.name is None:
        raise UserError(
            f"{key}: the checkpoint does not record its objective (no algo.parameterization in "
            f"its stored run config), so it cannot be checked against this run's family "
            f"{run.name}; evaluate this project's .ckpt, an HF directory or the reference's .ckpt "
            "with its hyper_parameters"
        )
    if ckpt.objective == run.objective:
        if ckpt.name != run.name:
            log.info(
                "%s: %s evaluated by %s (the same objective)",
                key,
                ckpt.describe("its length"),
                run.describe("model.length"),
            )
        return
    tune = ""
    if run.objective == "bd3lm" and ckpt.objective == "mdlm":
        tune = " (to fine-tune it into this BD3-LM: mode=train training.from_pretrained=...)"
    raise UserError(
        f"{key}: the checkpoint is {ckpt.describe('its length')} and this run "
        f"{run.describe('model.length')}; evaluate it with {ckpt.algo()}{tune}"
    )
