"""A model and its tokenizer from any checkpoint the project reads, for the lm-eval model
`bd3lm` (evaluation.lm_harness) and scripts/generate.py.

The checkpoint becomes an HF directory through `hf.export.loadable` (an HF directory
or hub id as it is; our .ckpt or the reference's pickled .ckpt exported to a temporary one).
The tokenizer is `tokenizer` (a directory or a name the data configs accept, such as gpt2) when
given, else the one saved with the checkpoint (HF directories from scripts/export_hf.py; our
.ckpt's run config; a hub repository's own), else gpt2 for the released repositories; the
reference's .ckpt needs it (its token ids are then the data pipeline's for that tokenizer).
"""

from __future__ import annotations

import contextlib
import os

from utils import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load(
    checkpoint: str,
    tokenizer: str | None,
    stack: contextlib.ExitStack,
    key: str = "checkpoint",
    tokenizer_key: str = "tokenizer=NAME",
    **from_pretrained,
):
    """(HF model (hf.BD3LM or MDLM), tokenizer) of `checkpoint` (see the module
    docstring), without transformers' progress bars; temporary exports live until `stack`
    closes. from_pretrained: keywords for the model's from_pretrained (dtype, device_map).
    UserError, one line naming `key` (or `tokenizer_key` where a tokenizer is needed), for a
    checkpoint that cannot be loaded."""
    from transformers import AutoTokenizer

    from checkpoints.layout import RELEASED, CheckpointError, is_hub_id, read_config_json
    from hf import BD3LM, MDLM
    from hf.export import loadable, quiet_progress_bars, tokenizer_vocab

    path = str(checkpoint)
    with quiet_progress_bars():
        local = loadable(path, tokenizer, stack, key, tokenizer_key)
        try:
            model_type = read_config_json(local).get("model_type")
        except CheckpointError as err:
            raise UserError(f"{key}={path}: {err}") from None
        cls = {"bd3lm": BD3LM, "mdlm": MDLM}.get(model_type)
        if cls is None:
            raise UserError(f"{key}={path}: model_type={model_type!r}; valid: bd3lm, mdlm")
        has_tokenizer = any(os.path.exists(os.path.join(local, f)) for f in TOKENIZER_FILES)
        try:
            model = cls.from_pretrained(local, **from_pretrained)
            model.config._name_or_path = path  # a released repository's name decides its family
            if tokenizer is None and not has_tokenizer and is_hub_id(path):
                try:  # a hub export with its tokenizer (loadable fetched the weights only)
                    return model, AutoTokenizer.from_pretrained(path)
                except OSError:
                    pass
            if tokenizer is None and not has_tokenizer:
                if path not in RELEASED:
                    raise UserError(
                        f"{key}={path} has no tokenizer files; pass {tokenizer_key} (a tokenizer "
                        "directory, or a name: gpt2, bert-base-uncased)"
                    )
                tokenizer = "gpt2"  # the released OpenWebText checkpoints
            name = tokenizer or local
            if os.path.isdir(name):
                return model, AutoTokenizer.from_pretrained(name)
            return model, tokenizer_vocab(name).tokenizer
        except (OSError, ValueError) as err:  # CheckpointError and bad JSON are ValueErrors
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{key}={path}: {reason[:200]}") from None
