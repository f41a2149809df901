#!/usr/bin/env bash
# Variable-length samples of AR (paper Table 6: median 4008, max 131K tokens): up to
# 131072 tokens, p = 0.9, KV cache; stop at an EOS or a low-entropy tail;
# 25 samples per seed, seeds 1-20 (500 documents), collected in outputs/samples/varlen_ar.
# SEEDS picks a subset. Summary (median and max length): python scripts/sample_stats.py
# outputs/samples/varlen_ar.
# One GPU per job, jobs of one setting share a name and run one after another
# (--dependency=singleton), so that their samples.jsonl appends never interleave; --no-requeue
# because a restarted job would append its seed's samples twice.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
for SEED in ${SEEDS:-$(seq 1 20)}; do
  "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J varlen_ar --gres=gpu:1 --ntasks-per-node=1 --no-requeue --dependency=singleton scripts/slurm/job.sbatch experiment=owt_varlen_ar seed=$SEED sampling.logdir=outputs/samples/varlen_ar "$@"
done
