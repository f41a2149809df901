"""lm-evaluation-harness with our model registered as `bd3lm`; every argument goes unchanged to
lm-eval's own CLI (named run_lm_eval.py so that it does not shadow the `lm_eval` package).

    python scripts/run_lm_eval.py --model bd3lm --model_args checkpoint=PATH,mc_samples=8 \\
        --tasks lambada_openai --output_path OUT

Bad `--model_args` (an unknown key, a missing checkpoint) print one `error:` line and exit 2,
as main.py does.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import UserError  # noqa: E402


def model_args(argv: list[str]) -> dict | None:
    """The `--model_args` of a `--model bd3lm` command line as a dict (lm-eval's
    `key=value,...` string or a JSON object), else None."""

    def value(flag: str) -> str | None:
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None

    if value("--model") != "bd3lm":
        return None
    text = value("--model_args") or ""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    return dict(
        item.split("=", 1) if "=" in item else (item, "") for item in text.split(",") if item
    )


def main() -> int:
    from lm_eval.__main__ import cli_evaluate

    from evaluation.lm_harness import check_model_args, register

    register()
    try:
        args = model_args(sys.argv[1:])
        if args is not None:
            check_model_args(args)  # before lm-eval spends seconds indexing its tasks
        cli_evaluate()  # reads sys.argv
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
