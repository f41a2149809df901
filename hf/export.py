"""Export: checkpoints -> HF directories (this package's classes; the reference's classes load
them too).

- `export_hf(checkpoint, out_dir)`: a checkpoint dict of a DiT run in our layout -> an HF
  directory.
- `export(ckpt, out_dir)`: our Lightning .ckpt -> an HF directory with the run's tokenizer and
  a model card (scripts/export_hf.py), by the exporter of the network the checkpoint's config
  names (`EXPORTERS`, keyed by model.backbone): a DiT -> this package's format (`export_ours`:
  BOS / EOS / mask / pad ids in config.json; padding_side "left"); a pretrained causal LM
  (hf_causal) -> a plain transformers causal LM (hf/export_causal.py).
- `loadable(path, tokenizer, stack)`: any checkpoint the project reads (an HF directory, a hub
  id, our .ckpt, the reference's pickled .ckpt) -> an HF directory that `hf`'s classes and
  transformers' AutoTokenizer load; .ckpt files are exported to a temporary directory
  (scripts/generate.py and the lm-eval model `bd3lm` load through it).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

from checkpoints.layout import (
    CLIP_BUFFERS,
    CheckpointError,
    LoadedCheckpoint,
    infer_dit_shape,
    is_hub_id,
    resolve_pretrained,
    split_backbone,
)
from hf.configuration import BD3LMConfig, MDLMConfig
from hf.modeling import BD3LM, MDLM
from utils import UserError, atomic_path, follow_umask

EXPORTED = ("ar", "subs", "sedd")  # the parameterizations hf/ holds: AR, BD3-LM / MDLM, SEDD

CARD = """---
library_name: transformers
tags: [block-diffusion, bd3lm, masked-diffusion]
---
# {name}

A {kind} language model exported from a BD3-LM framework run (block diffusion: "Block
Diffusion: Interpolating Between Autoregressive and Diffusion Language Models", ICLR 2025).

- model_type `{model_type}`, block size {block_size}, trained context {model_length} tokens,
  vocabulary {vocab_size} (tokenizer `{tokenizer}` included here)
- weights: {weights}

This directory has no modeling code (no `auto_map`): load it with the framework's classes.

```python
import hf  # registers {model_type} with AutoConfig / AutoModelForMaskedLM
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained(PATH)
tokenizer = AutoTokenizer.from_pretrained(PATH)
prompts = ["To be", "O Romeo"]
batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
out = model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=32)
print(tokenizer.batch_decode(out, skip_special_tokens=True))  # prompts + continuations
```
"""


def export_hf(
    checkpoint: dict,
    out_dir: str,
    use_ema: bool = True,
    token_ids: dict[str, int] | None = None,
    extra_files=None,
) -> str:
    """Write a checkpoint in our layout (EMA weights unless use_ema=False, and the learned clip
    interval buffers) as an HF directory: BD3LM format (model_type bd3lm) for BD3-LM and AR
    runs, MDLM format (model_type mdlm) for MDLM and SEDD runs, with the objective named in
    config.json's `parameterization` (ar, subs or sedd). attn_backend is written as sdpa.

    token_ids: {"bos_token_id", "eos_token_id", "mask_token_id", "pad_token_id"} to record in
    config.json (hf's generate reads them). No `auto_map` is written: the directory ships
    no modeling code, so it loads with `hf`'s classes (or AutoModelForMaskedLM after importing
    it), never as remote code. extra_files(tmp_dir): called before the directory is moved
    into place, to add files (the tokenizer, a model card). Every file gets the permissions
    of a file created under the process umask (0644 under umask 022)."""
    config = checkpoint.get("config")
    if not isinstance(config, dict):
        raise UserError("export: the checkpoint has no run config (not written by this project)")
    algo, model_cfg = config["algo"], config["model"]
    if algo.get("parameterization") not in EXPORTED:
        raise no_hf_model(config)
    backbone = backbone_of(checkpoint)
    if backbone != "dit":
        raise UserError(
            f"model.backbone={backbone}: the hf package's classes hold DiTs only; "
            "scripts/export_hf.py exports this run as a plain transformers causal LM"
        )
    inner, rest = split_backbone(checkpoint["state_dict"])
    ema = checkpoint.get("ema")
    if use_ema and ema is not None:
        inner = {**inner, **ema["shadow"]}
    shape = infer_dit_shape(inner)
    common = {
        "vocab_size": shape["vocab_size"],
        "model_length": int(model_cfg["length"]),
        "hidden_dim": shape["hidden_size"],
        "cond_dim": shape["cond_dim"] or int(model_cfg["cond_dim"]),
        "n_blocks": shape["n_blocks"],
        "n_heads": int(model_cfg["n_heads"]),
        "dropout": float(model_cfg["dropout"]),
        "time_conditioning": bool(algo.get("time_conditioning", False)),
        "return_dict": False,
    }
    is_ar = algo["parameterization"] == "ar"
    var_min = all(k in rest for k in CLIP_BUFFERS)
    if not is_ar and not algo.get("cross_attn") and not var_min:
        cls, hf_config = MDLM, MDLMConfig(**common)
    else:
        cls = BD3LM
        clip = {k: float(rest[k]) for k in CLIP_BUFFERS if k in rest}
        hf_config = BD3LMConfig(
            block_size=1 if is_ar else int(config["block_size"]),
            cross_attn=bool(algo.get("cross_attn")) and not is_ar,
            adaln=shape["adaln"],
            attn_backend="sdpa",
            causal=is_ar,
            var_min=var_min,
            sampling_eps_min=clip.get("sampling_eps_min", 1e-3),
            sampling_eps_max=clip.get("sampling_eps_max", 0.999),
            **common,
        )
    # the objective by name: a time-conditioned MDLM and SEDD share this layout
    hf_config.parameterization = str(algo["parameterization"])
    for name, value in (token_ids or {}).items():
        setattr(hf_config, name, int(value))
    if hasattr(hf_config, "auto_map"):
        del hf_config.auto_map  # it would point at configuration_*.py files not shipped here
    model = cls(hf_config)
    state = {f"backbone.{k}": v for k, v in inner.items()}
    state.update({k: rest[k] for k in CLIP_BUFFERS if k in rest and var_min})
    try:
        model.load_strict(state, what="export")
    except CheckpointError as err:
        raise UserError(str(err)) from None
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)
        follow_umask(tmp)
    return out_dir


def no_hf_model(config: dict) -> UserError:
    """The refusal of a run whose network and objective no exporter takes (SSD-LM)."""
    algo = config.get("algo") or {}
    return UserError(
        f"algo={algo.get('name', algo.get('parameterization'))} has no HF model (the hf "
        "package holds AR, BD3-LM, MDLM and SEDD on the DiT; pretrained causal LMs export as "
        "themselves); valid: ar, bd3lm, mdlm and sedd checkpoints, model.backbone=dit or "
        "hf_causal"
    )


def backbone_of(checkpoint: dict) -> str:
    """The model.backbone of our checkpoint dict's network (checkpoints.load.stored_backbone)."""
    from checkpoints.load import stored_backbone

    return stored_backbone(LoadedCheckpoint("export", "ours", raw=checkpoint))


def as_export_input(loaded) -> dict:
    """A checkpoint read by checkpoints.load.read_any_checkpoint in the reference's pickled
    format (a LoadedCheckpoint with kind, dit, weights (EMA where the file has them), clip and
    meta) as the dict export_hf takes: the run config it implies and the backbone weights."""
    kind, dit, meta = loaded.kind, loaded.dit, loaded.meta
    window = meta.get("model_length")
    if window is None:
        raise UserError(f"{loaded.source}: the run config records no model.length")
    config = {
        "algo": {
            "parameterization": {"ar": "ar", "sedd": "sedd"}.get(kind, "subs"),
            "cross_attn": kind == "bd3lm",
            "time_conditioning": bool(meta.get("time_conditioning", kind == "sedd")),
        },
        "model": {
            "length": int(window),
            "n_heads": dit.n_heads,
            "cond_dim": dit.cond_dim,
            "dropout": 0.0,
        },
        "block_size": int(meta.get("block_size", window)),
    }
    state = {f"backbone.{k}": v for k, v in loaded.weights.items()}
    state.update(loaded.clip)
    return {"config": config, "state_dict": state}


def tokenizer_vocab(name: str):
    """data.vocab.Vocab of a tokenizer directory or of a name as data.tokenizer_name_or_path
    takes it (the offline copies of gpt2 and bert-base-uncased included), cached where the data
    configs cache it: the tokenizer and the BOS / EOS / mask ids training used with it."""
    from data.vocab import get_vocab

    home = os.environ.get("HOME", "/tmp")
    cache = os.environ.get("BD3LMS_CACHE", os.path.join(home, ".cache", "bd3lms"))
    return get_vocab({"tokenizer_name_or_path": name, "cache_dir": cache})


def vocab_token_ids(vocab) -> dict[str, int]:
    """The ids export_hf records for a data.vocab.Vocab: BOS, EOS, mask, and the tokenizer's
    pad id where it has one."""
    ids = {
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "mask_token_id": vocab.mask_id,
    }
    if vocab.tokenizer.pad_token_id is not None:
        ids["pad_token_id"] = vocab.tokenizer.pad_token_id
    return ids


def write_tokenizer(directory: str, tokenizer) -> None:
    """The files of `tokenizer` (a transformers tokenizer) into `directory`, padding on the
    left, so each row generate returns is padding, prompt, continuation, with no padding
    between the prompt and its continuation."""
    tokenizer.save_pretrained(directory)
    # save_pretrained writes only the init keywords, so a padding_side set on the object is lost
    tokenizer_config = os.path.join(directory, "tokenizer_config.json")
    with open(tokenizer_config) as f:
        fields = json.load(f)
    with open(tokenizer_config, "w") as f:
        json.dump({**fields, "padding_side": "left"}, f, indent=2)


def write_card(directory: str, checkpoint: dict, use_ema: bool, name: str) -> None:
    """README.md, the model card of the export of our checkpoint in `directory`."""
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    card = CARD.format(
        name=name,
        kind="autoregressive" if config.get("causal") else "block diffusion",
        model_type=config["model_type"],
        block_size=config.get("block_size", config["model_length"]),
        model_length=config["model_length"],
        vocab_size=config["vocab_size"],
        tokenizer=checkpoint["config"]["data"].get("tokenizer_name_or_path"),
        weights="EMA" if use_ema and checkpoint.get("ema") is not None else "live",
    )
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(card)


def export_ours(checkpoint: dict, out_dir: str, use_ema: bool = True) -> str:
    """export_hf of our checkpoint dict with its run's tokenizer (data.*), token ids and model
    card; UserError for a checkpoint whose run config has no data.*."""
    from data.vocab import get_vocab

    data_cfg = (checkpoint.get("config") or {}).get("data")
    if not isinstance(data_cfg, dict):
        raise UserError("the checkpoint has no run config (data.*)")
    vocab = get_vocab(data_cfg)
    name = os.path.basename(os.path.normpath(out_dir))

    def files(tmp: str) -> None:
        write_tokenizer(tmp, vocab.tokenizer)
        write_card(tmp, checkpoint, use_ema, name)

    ids = vocab_token_ids(vocab)
    return export_hf(checkpoint, out_dir, use_ema=use_ema, token_ids=ids, extra_files=files)


def _export_causal(checkpoint: dict, out_dir: str, use_ema: bool = True) -> str:
    from hf.export_causal import export_causal_checkpoint

    return export_causal_checkpoint(checkpoint, out_dir, use_ema=use_ema)


# model.backbone -> exporter(checkpoint dict, out_dir, use_ema) -> out_dir
EXPORTERS = {"dit": export_ours, "hf_causal": _export_causal}


def export_checkpoint(checkpoint: dict, out_dir: str, use_ema: bool = True) -> str:
    """Our checkpoint dict -> the HF directory `out_dir`, by the exporter of the network its
    run config names (EXPORTERS; a DiT's objective may still have no HF model: SSD-LM)."""
    config = checkpoint.get("config")
    if not isinstance(config, dict):
        raise UserError("the checkpoint has no run config (not written by this project)")
    exporter = EXPORTERS.get(backbone_of(checkpoint))
    if exporter is None:
        raise no_hf_model(config)
    return exporter(checkpoint, out_dir, use_ema=use_ema)


def export(ckpt: str, out_dir: str, live: bool = False) -> str:
    """Export our .ckpt `ckpt` to the new HF directory `out_dir` (EMA weights unless live;
    `export_checkpoint`); UserError, one line, for a bad checkpoint or an existing `out_dir`."""
    from checkpoints.ours import read_checkpoint

    if os.path.exists(out_dir):
        raise UserError(f"{out_dir} exists; give a new directory")
    checkpoint = read_checkpoint(ckpt, "CKPT")
    try:
        return export_checkpoint(checkpoint, out_dir, use_ema=not live)
    except UserError as err:
        raise UserError(f"CKPT={ckpt}: {err}") from None


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' progress bars off (save_pretrained draws "Writing model shards",
    from_pretrained "Loading weights"), restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def loadable(
    path: str,
    tokenizer: str | None,
    stack: contextlib.ExitStack,
    key: str = "checkpoint",
    tokenizer_key: str = "tokenizer=NAME",
) -> str:
    """An HF directory (config.json + weights) for any checkpoint the project reads:
    - an HF directory: itself; a hub id: its local snapshot (config.json and weights);
    - our Lightning .ckpt: exported with its EMA weights, its run's tokenizer and token ids;
    - the reference's pickled .ckpt: exported with `tokenizer` (a tokenizer directory or a name
      data.tokenizer_name_or_path takes), whose BOS / EOS / mask ids are those training used
      with it; required, since the file's pickled tokenizer is not read.
    Exports are written without progress bars to a temporary directory that lives until `stack`
    closes. UserError, one line naming `key`, for a path that is none of these or a checkpoint
    that cannot be exported (SSD-LM), and naming `tokenizer_key` (how the caller takes the
    tokenizer) for the reference's .ckpt without one."""
    from checkpoints.load import read_any_checkpoint

    if os.path.isdir(path) or is_hub_id(path):
        try:
            return resolve_pretrained(path)
        except CheckpointError as err:
            raise UserError(f"{key}={path}: {err}") from None
    loaded = read_any_checkpoint(path, key)  # a missing or unreadable file: one line
    if loaded.format == "reference" and tokenizer is None:
        raise UserError(
            f"{key}={path} is the reference's .ckpt, which names no usable tokenizer; pass "
            f"{tokenizer_key} (gpt2 for OpenWebText runs, bert-base-uncased for LM1B runs, or a "
            "tokenizer directory)"
        )
    out = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "hf")
    with quiet_progress_bars():
        try:
            if loaded.format == "ours":
                return export_ours(loaded.raw, out)
            vocab = tokenizer_vocab(tokenizer)

            def files(tmp: str) -> None:
                write_tokenizer(tmp, vocab.tokenizer)

            ids = vocab_token_ids(vocab)
            return export_hf(as_export_input(loaded), out, token_ids=ids, extra_files=files)
        except UserError as err:
            raise UserError(f"{key}={path}: {err}") from None
