#!/usr/bin/env bash
# OpenWebText BD3-LM stage 2 (paper Table 4; the reference README's "Training"): fine-tune the
# block-size-1024 pre-train at K = 4, 8, 16 for 150K steps with the clip search and resampling,
# 8 GPUs x 16 x 4. Default start: the released kuleshov-group/bd3lm-owt-block_size1024-pretrain;
# PRETRAIN=outputs/slurm/owt_bd3lm_pretrain/checkpoints/last.ckpt uses our own stage 1.
# BLOCK_SIZES="4" picks a subset. Run directories outputs/slurm/owt_bd3lm_finetune_bsK.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
for K in ${BLOCK_SIZES:-4 8 16}; do
  "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J owt_bd3lm_finetune_bs$K scripts/slurm/job.sbatch experiment=owt_bd3lm_finetune block_size=$K ${PRETRAIN:+training.from_pretrained=$PRETRAIN} "$@"
done
