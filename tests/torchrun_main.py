"""`main.run` for several runs in each process of one torchrun launch (the two-process tests):

    python -m torch.distributed.run --nproc_per_node=2 tests/torchrun_main.py \\
        RUN_DIR OVERRIDE... [--- RUN_DIR OVERRIDE...]

torchrun starts the processes (Lightning sees them as launched externally), so one launch
serves every run; a UserError exits with code 2 as main.py does."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402
from utils import UserError  # noqa: E402


def jobs(argv: list[str]) -> list[list[str]]:
    out, current = [], []
    for arg in argv:
        if arg == "---":
            out.append(current)
            current = []
        else:
            current.append(arg)
    return [*out, current]


if __name__ == "__main__":
    try:
        for run_dir, *overrides in jobs(sys.argv[1:]):
            main.run(main.compose(overrides, run_dir), run_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
