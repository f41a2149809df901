#!/usr/bin/env bash
# Train the LM1B AR baseline (paper Table 3: PPL 22.83): 4 GPUs x 128 x 1, L = 128, 1M steps.
# Run directory outputs/slurm/lm1b_ar; resubmitting resumes it.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
"${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J lm1b_ar --gres=gpu:4 --ntasks-per-node=4 scripts/slurm/job.sbatch experiment=lm1b_ar "$@"
