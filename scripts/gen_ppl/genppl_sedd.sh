#!/usr/bin/env bash
# Generative perplexity of SEDD at L = 1024 (paper Table 7): T = 1000, p = 0.99,
# 25 samples per seed, seeds 1-12, collected in outputs/samples/genppl_sedd_len1024. SEEDS picks
# a subset.
# One GPU per job, jobs of one setting share a name and run one after another
# (--dependency=singleton), so that their samples.jsonl appends never interleave; --no-requeue
# because a restarted job would append its seed's samples twice.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
for SEED in ${SEEDS:-$(seq 1 12)}; do
  "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J genppl_sedd_len1024 --gres=gpu:1 --ntasks-per-node=1 --no-requeue --dependency=singleton scripts/slurm/job.sbatch experiment=owt_genppl_sedd model.length=1024 seed=$SEED sampling.logdir=outputs/samples/genppl_sedd_len1024 "$@"
done
