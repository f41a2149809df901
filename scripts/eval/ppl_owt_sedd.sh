#!/usr/bin/env bash
# Test perplexity of the OpenWebText SEDD baseline (paper Table 4: eval batch 16,
# L = 1024, algo.ignore_bos=false) on one GPU; the checkpoint of train/train_owt_sedd.sh.
# Result: outputs/slurm/ppl_owt_sedd/ppl_eval.json.
# The experiment's OWT data flags apply (no EOS between validation documents); the reference's
# ppl scripts leave data.insert_valid_eos at its default: add data.insert_valid_eos=true for that.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
"${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J ppl_owt_sedd --gres=gpu:1 --ntasks-per-node=1 scripts/slurm/job.sbatch experiment=owt_sedd mode=ppl_eval algo.ignore_bos=false wandb=null eval.checkpoint_path=${CKPT_ROOT:-outputs/slurm}/owt_sedd/checkpoints/last.ckpt "$@"
