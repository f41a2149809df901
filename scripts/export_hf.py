"""Export one of our Lightning checkpoints as an HF directory (config.json + model.safetensors)
that `models.hf` and the reference's own classes load: EMA weights (unless --live) and the
learned clip-interval buffers, the run's tokenizer (its BOS / EOS / mask ids recorded in
config.json; padding_side "left") and a model card (README.md). No auto_map: the directory
ships no modeling code; load it with `models.hf.BD3LM` / `MDLM` or, after `import models.hf`,
`AutoModelForMaskedLM`.

    python scripts/export_hf.py outputs/.../checkpoints/best.ckpt exported/bd3lm-k4
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoints import export_hf, read_checkpoint  # noqa: E402
from utils import UserError  # noqa: E402

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
import models.hf  # registers {model_type} with AutoConfig / AutoModelForMaskedLM
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained(PATH)
tokenizer = AutoTokenizer.from_pretrained(PATH)
prompts = ["To be", "O Romeo"]
batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
out = model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=32)
print(tokenizer.batch_decode(out, skip_special_tokens=True))  # prompts + continuations
```
"""


def write_tokenizer_and_card(
    directory: str, checkpoint: dict, vocab, use_ema: bool, name: str
) -> None:
    """The tokenizer files and README.md model card into `directory`. The tokenizer pads on
    the left, so each row generate returns is padding, prompt, continuation, with no padding
    between the prompt and its continuation."""
    import json

    vocab.tokenizer.save_pretrained(directory)
    # save_pretrained writes only the init keywords, so a padding_side set on the object is lost
    tokenizer_config = os.path.join(directory, "tokenizer_config.json")
    with open(tokenizer_config) as f:
        fields = json.load(f)
    with open(tokenizer_config, "w") as f:
        json.dump({**fields, "padding_side": "left"}, f, indent=2)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    data = checkpoint["config"]["data"]
    card = CARD.format(
        name=name,
        kind="autoregressive" if config.get("causal") else "block diffusion",
        model_type=config["model_type"],
        block_size=config.get("block_size", config["model_length"]),
        model_length=config["model_length"],
        vocab_size=config["vocab_size"],
        tokenizer=data.get("tokenizer_name_or_path"),
        weights="EMA" if use_ema and checkpoint.get("ema") is not None else "live",
    )
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(card)


def token_ids_and_files(checkpoint: dict, out_dir: str, use_ema: bool = True):
    """(token_ids, extra_files) for export_hf: the BOS / EOS / mask (and pad) ids of the run's
    tokenizer and a writer of the tokenizer and model card; (None, None) for a checkpoint whose
    run config has no data.* (the reference's .ckpt: weights only)."""
    from omegaconf import OmegaConf

    import dataloader

    data_cfg = (checkpoint.get("config") or {}).get("data")
    if not isinstance(data_cfg, dict):
        return None, None
    vocab = dataloader.get_vocab(OmegaConf.create(data_cfg))
    ids = {
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "mask_token_id": vocab.mask_id,
    }
    if vocab.tokenizer.pad_token_id is not None:
        ids["pad_token_id"] = vocab.tokenizer.pad_token_id
    name = os.path.basename(os.path.normpath(out_dir))
    return ids, lambda tmp: write_tokenizer_and_card(tmp, checkpoint, vocab, use_ema, name)


def export(ckpt: str, out_dir: str, live: bool = False) -> str:
    """Export our .ckpt `ckpt` to the new HF directory `out_dir` (EMA weights unless live);
    UserError, one line, for a bad checkpoint or an existing `out_dir`."""
    if os.path.exists(out_dir):
        raise UserError(f"{out_dir} exists; give a new directory")
    checkpoint = read_checkpoint(ckpt, "CKPT")
    ids, files = token_ids_and_files(checkpoint, out_dir, not live)
    if ids is None:
        raise UserError(f"{ckpt}: the checkpoint has no run config (data.*)")
    return export_hf(checkpoint, out_dir, use_ema=not live, token_ids=ids, extra_files=files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("ckpt", help="our Lightning .ckpt")
    parser.add_argument("out_dir", help="directory to write (must not exist)")
    parser.add_argument("--live", action="store_true", help="export the live, not EMA, weights")
    args = parser.parse_args(argv)
    try:
        export(args.ckpt, args.out_dir, args.live)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
