"""lm-evaluation-harness with our model registered as `bd3lm`; every argument goes unchanged to
lm-eval's own CLI (named run_lm_eval.py so that it does not shadow the `lm_eval` package).

    python scripts/run_lm_eval.py --model bd3lm --model_args checkpoint=PATH,mc_samples=8 \\
        --tasks lambada_openai --output_path OUT

Bad `--model_args` (an unknown key, a missing checkpoint) print one `error:` line and exit 2,
as main.py does.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import UserError  # noqa: E402


def main() -> int:
    from lm_eval.__main__ import cli_evaluate

    from evaluation.lm_harness import register

    register()
    try:
        cli_evaluate()  # reads sys.argv
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
