#!/usr/bin/env bash
# Generative perplexity of SSD-LM at L = 1025 and 2050 (BOS included; Table 7 of the BD3-LM
# paper, docs/ssdlm.md): the released roberta-large SSD-LM in checkpoints/ssdlm (download
# xhan77/ssdlm there first), blocks of 25, T = 1000 steps per block (STEPS="1000 25" adds the
# T = 25 row), top-p 0.95, k = 5, 25 samples per seed, seeds 1-12, collected in
# outputs/samples/genppl_ssdlm_T${T}_len$L. LENGTHS, STEPS, SEEDS pick subsets.
# One GPU per job, jobs of one setting share a name and run one after another
# (--dependency=singleton), so that their samples.jsonl appends never interleave; --no-requeue
# because a restarted job would append its seed's samples twice.
# Extra arguments go to main.py (last, so they win). Env: SBATCH_ARGS (more sbatch options, e.g.
# "--partition=gpu --account=me"), SBATCH (the submit command, default sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.." && mkdir -p watch_folder
for L in ${LENGTHS:-1025 2050}; do for T in ${STEPS:-1000}; do for SEED in ${SEEDS:-$(seq 1 12)}; do
  "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J genppl_ssdlm_T${T}_len$L --gres=gpu:1 --ntasks-per-node=1 --no-requeue --dependency=singleton scripts/slurm/job.sbatch experiment=owt_genppl_ssdlm algo.T=$T model.length=$L seed=$SEED sampling.logdir=outputs/samples/genppl_ssdlm_T${T}_len$L "$@"
done; done; done
