"""Export one of our Lightning checkpoints as an HF directory (config.json + model.safetensors,
EMA weights unless --live, the run's tokenizer with padding_side "left", a model card).

A DiT run (model.backbone=dit) -> the `hf` format that `hf`'s classes and the reference's own
classes load: the learned clip-interval buffers, BOS / EOS / mask ids in config.json. No
auto_map: the directory ships no modeling code; load it with `hf.BD3LM` / `MDLM` or, after
`import hf`, `AutoModelForMaskedLM`.
A pretrained-causal-LM run (model.backbone=hf_causal) -> the adapted model as a plain
transformers causal LM (`AutoModelForCausalLM`), its tokenizer with the mask token, and
config.json naming bd3lm_block_size, mask_token_id, bd3lm_token_shift and
bd3lm_clean_attention; `model=hf_causal model.pretrained=DIR` reads it back. Rebuilding it
loads the run's model.pretrained, which must still load here.
The export itself is `hf.export.export`.

    python scripts/export_hf.py outputs/.../checkpoints/best.ckpt exported/bd3lm-k4
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf.export import export  # noqa: E402
from utils import UserError  # noqa: E402


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
