"""Export one of our Lightning checkpoints as an HF directory (config.json + model.safetensors)
that `hf`'s classes and the reference's own classes load: EMA weights (unless --live) and the
learned clip-interval buffers, the run's tokenizer (its BOS / EOS / mask ids recorded in
config.json; padding_side "left") and a model card (README.md). No auto_map: the directory
ships no modeling code; load it with `hf.BD3LM` / `MDLM` or, after `import hf`,
`AutoModelForMaskedLM`. The export itself is `hf.export.export`.

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
