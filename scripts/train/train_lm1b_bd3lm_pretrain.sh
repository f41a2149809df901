#!/usr/bin/env bash
# LM1B BD3-LM stage 1: block size K = L = 128 (the MDLM objective) for 850K steps on 4 GPUs x
# 64 x 2. train_lm1b_bd3lm.sh fine-tunes from its last checkpoint,
# outputs/slurm/lm1b_bd3lm_pretrain/checkpoints/last.ckpt.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
"${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J lm1b_bd3lm_pretrain --gres=gpu:4 --ntasks-per-node=4 scripts/slurm/job.sbatch experiment=lm1b_bd3lm_pretrain "$@"
