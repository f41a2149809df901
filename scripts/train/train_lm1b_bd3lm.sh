#!/usr/bin/env bash
# LM1B BD3-LM stage 2 (paper Table 3): fine-tune the K = 128 pre-train at K = 4, 8, 16 for 150K
# steps with the clip search and resampling, 4 GPUs x 64 x 2. BLOCK_SIZES="4" picks a subset;
# PRETRAIN=PATH.ckpt another stage-1 checkpoint. Chain after the pre-train with
# SBATCH_ARGS=--dependency=afterok:JOBID. Run directories outputs/slurm/lm1b_bd3lm_finetune_bsK.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
for K in ${BLOCK_SIZES:-4 8 16}; do
  "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J lm1b_bd3lm_finetune_bs$K --gres=gpu:4 --ntasks-per-node=4 scripts/slurm/job.sbatch experiment=lm1b_bd3lm_finetune block_size=$K ${PRETRAIN:+training.from_pretrained=$PRETRAIN} "$@"
done
