#!/usr/bin/env bash
# Train the OpenWebText SEDD baseline (paper Table 4: PPL <= 24.10): 8 GPUs x 16 x 4, L = 1024,
# 1M steps, no BOS/EOS specials (the "noeos" model that gen_ppl/ and var_len/ sample from).
# Run directory outputs/slurm/owt_sedd; resubmitting resumes it.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
"${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J owt_sedd scripts/slurm/job.sbatch experiment=owt_sedd "$@"
