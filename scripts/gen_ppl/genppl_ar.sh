#!/usr/bin/env bash
# Generative perplexity of AR at L = 1024, 2048 (paper Table 7): p = 0.9, KV cache,
# 25 samples per seed, seeds 1-12, collected in outputs/samples/genppl_ar_lenL. LENGTHS, SEEDS
# pick subsets.
# One GPU per job, jobs of one setting share a name and run one after another
# (--dependency=singleton), so that their samples.jsonl appends never interleave; --no-requeue
# because a restarted job would append its seed's samples twice.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
for L in ${LENGTHS:-1024 2048}; do for SEED in ${SEEDS:-$(seq 1 12)}; do
  "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J genppl_ar_len$L --gres=gpu:1 --ntasks-per-node=1 --no-requeue --dependency=singleton scripts/slurm/job.sbatch experiment=owt_genppl_ar model.length=$L seed=$SEED sampling.logdir=outputs/samples/genppl_ar_len$L "$@"
done; done
