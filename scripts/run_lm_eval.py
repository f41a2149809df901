"""lm-evaluation-harness with our model registered as `bd3lm`; every argument goes unchanged to
lm-eval's own CLI (named run_lm_eval.py so that it does not shadow the `lm_eval` package).

    python scripts/run_lm_eval.py --model bd3lm --model_args checkpoint=PATH,mc_samples=8 \\
        --tasks lambada_openai --output_path OUT
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from evaluation.lm_harness import register

    register()
    cli_evaluate()  # reads sys.argv


if __name__ == "__main__":
    main()
