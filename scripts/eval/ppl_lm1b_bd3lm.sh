#!/usr/bin/env bash
# Test perplexity of the LM1B BD3-LMs K = 4, 8, 16 (paper Table 3: eval batch 128, flex)
# on one GPU each; the checkpoints of train/train_lm1b_bd3lm.sh. BLOCK_SIZES="4" picks a subset.
# Results: outputs/slurm/ppl_lm1b_bd3lm_bsK/ppl_eval.json.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
for K in ${BLOCK_SIZES:-4 8 16}; do
  "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J ppl_lm1b_bd3lm_bs$K --gres=gpu:1 --ntasks-per-node=1 scripts/slurm/job.sbatch experiment=lm1b_bd3lm_finetune block_size=$K mode=ppl_eval loader.eval_batch_size=128 wandb=null eval.checkpoint_path=${CKPT_ROOT:-outputs/slurm}/lm1b_bd3lm_finetune_bs$K/checkpoints/last.ckpt "$@"
done
