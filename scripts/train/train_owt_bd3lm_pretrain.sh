#!/usr/bin/env bash
# OpenWebText BD3-LM stage 1: block size K = L = 1024 (the MDLM objective) for 850K steps on
# 8 GPUs x 16 x 4: re-creates kuleshov-group/bd3lm-owt-block_size1024-pretrain. Fine-tune from it
# with PRETRAIN=outputs/slurm/owt_bd3lm_pretrain/checkpoints/last.ckpt train_owt_bd3lm.sh.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
"${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J owt_bd3lm_pretrain scripts/slurm/job.sbatch experiment=owt_bd3lm_pretrain "$@"
