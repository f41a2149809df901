"""Checkpoints: every format read strictly by name, and nothing in a file executed.

- `layout`: what all formats share (no Lightning): `CheckpointError`, key prefixes, the strict
  key check, the keyed adapter of the reference's DiT family, HF directories and hub ids, the
  released-repo table (`RELEASED`: family and the paper's OWT perplexity), `LoadedCheckpoint`.
- `ours`: our Lightning `.ckpt` (read with `weights_only`), strict loading, fine-tuning start.
- `reference`: the reference's pickled `.ckpt` (through `unpickle`, a restricted unpickler).
- `load`: the one entry point, `read_any_checkpoint` + `load_checkpoint_into` (evaluation
  refuses a checkpoint of another objective family; fine-tuning may cross families),
  `check_backbone` (the checkpoint's network is the run's `model.backbone`) and
  `trained_length` (the window a checkpoint was trained with). A released format that only
  one objective reads is that objective's registry entry's (`registry.ReleasedFormat`).
- `family`: the objective family of a checkpoint and of a run (`Family`) and `check_family`.
- `sanity`: the loading sanity check.

Exporting a checkpoint as an HF directory is `hf.export`'s (the HF classes live in `hf`, above
this package).
"""

from checkpoints.layout import CheckpointError, LoadedCheckpoint
from checkpoints.load import (
    check_backbone,
    load_checkpoint_into,
    read_any_checkpoint,
    trained_length,
)
from checkpoints.ours import check_state, load_pretrained, load_weights, read_checkpoint
from checkpoints.sanity import ppl_threshold, sanity_check_perplexity

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "check_state",
    "load_checkpoint_into",
    "load_pretrained",
    "load_weights",
    "ppl_threshold",
    "read_any_checkpoint",
    "read_checkpoint",
    "check_backbone",
    "sanity_check_perplexity",
    "trained_length",
]
