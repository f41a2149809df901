#!/usr/bin/env bash
# Test perplexity of the OpenWebText BD3-LMs K = 4, 8, 16 (paper Table 4; the reference README's
# "Likelihood evaluation": eval batch 16, flex, data.insert_valid_special=False) on one GPU each;
# the checkpoints of train/train_owt_bd3lm.sh. The released weights instead: BLOCK_SIZES=4 ...
# algo.backbone=hf_dit eval.checkpoint_path=kuleshov-group/bd3lm-owt-block_size4.
# Results: outputs/slurm/ppl_owt_bd3lm_bsK/ppl_eval.json.
# The experiment's OWT data flags apply (no EOS between validation documents); the reference's
# ppl scripts leave data.insert_valid_eos at its default: add data.insert_valid_eos=true for that.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
for K in ${BLOCK_SIZES:-4 8 16}; do
  "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J ppl_owt_bd3lm_bs$K --gres=gpu:1 --ntasks-per-node=1 scripts/slurm/job.sbatch experiment=owt_bd3lm_finetune block_size=$K mode=ppl_eval data.insert_valid_special=false wandb=null eval.checkpoint_path=${CKPT_ROOT:-outputs/slurm}/owt_bd3lm_finetune_bs$K/checkpoints/last.ckpt "$@"
done
