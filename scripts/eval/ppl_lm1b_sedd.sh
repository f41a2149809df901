#!/usr/bin/env bash
# Test perplexity of the LM1B SEDD baseline (paper Table 3: eval batch 128, L = 128) on
# one GPU; the checkpoint of train/train_lm1b_sedd.sh (CKPT_ROOT=DIR moves the runs' root).
# Result: outputs/slurm/ppl_lm1b_sedd/ppl_eval.json.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
"${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J ppl_lm1b_sedd --gres=gpu:1 --ntasks-per-node=1 scripts/slurm/job.sbatch experiment=lm1b_sedd mode=ppl_eval loader.eval_batch_size=128 wandb=null eval.checkpoint_path=${CKPT_ROOT:-outputs/slurm}/lm1b_sedd/checkpoints/last.ckpt "$@"
