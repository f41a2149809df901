#!/usr/bin/env bash
# Zero-shot likelihood of an OpenWebText-trained model on the paper's suite (paper Table 5):
# experiment=owt_zeroshot (mode=ppl_eval, model.length=1024, loader.eval_batch_size=16,
# documents concatenated without EOS, each 1024 chunk BOS + 1022 tokens + EOS).
#
#   scripts/zero_shot/zs_ppl.sh ALGO CHECKPOINT [BLOCK_SIZE] [extra main.py overrides...]
#     ALGO: bd3lm | mdlm | ar | sedd     CHECKPOINT: a .ckpt path, HF directory or hub id
#   DATASETS="ptb lambada" scripts/zero_shot/zs_ppl.sh bd3lm ckpt.ckpt 4   # a subset
#   SLURM=1 scripts/zero_shot/zs_ppl.sh ...        # one slurm job (1 GPU) per data set through
#                                                  # scripts/slurm/job.sbatch (SBATCH_ARGS=...)
#   TABLE_ONLY=1 scripts/zero_shot/zs_ppl.sh ...   # only print the table of finished runs
#   Offline: add data.source=/path/to/<dataset copy> per dataset (see scripts/zero_shot/README.md).
# Results: outputs/zero_shot/<algo>_bs<block>/<dataset>/ppl_eval.json (ZS_ROOT=... moves them)
# and the paper's Table 5 layout of them (scripts/paper_tables.py; ZS_TABLE=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: zs_ppl.sh ALGO CHECKPOINT [BLOCK_SIZE] [overrides...]"
ALGO=${1:?$USAGE}
CKPT=${2:?$USAGE}
BLOCK_SIZE=${3:-4}
shift $(( $# < 3 ? $# : 3 ))
PYTHON=${PYTHON:-python}
DATASETS=${DATASETS:-"ptb wikitext103 lm1b-gpt2 lambada ag_news scientific_papers_pubmed scientific_papers_arxiv"}
case "$ALGO" in
  ar | mdlm | sedd) ALGO_ARGS=(algo="$ALGO") ;;
  bd3lm) ALGO_ARGS=(algo=bd3lm block_size="$BLOCK_SIZE") ;;
  *) echo "error: ALGO=$ALGO: use bd3lm, mdlm, ar or sedd" >&2; exit 2 ;;
esac
OUT=${ZS_ROOT:-outputs/zero_shot}/${ALGO}_bs${BLOCK_SIZE}
[ -n "${SLURM:-}" ] && mkdir -p watch_folder
for DATA in $DATASETS; do
  ARGS=(experiment=owt_zeroshot "${ALGO_ARGS[@]}" data="$DATA" eval.checkpoint_path="$CKPT"
    hydra.run.dir="$OUT/$DATA" "$@")
  if [ -n "${TABLE_ONLY:-}" ]; then
    continue
  elif [ -n "${SLURM:-}" ]; then
    "${SBATCH:-sbatch}" ${SBATCH_ARGS:-} -J "zs_${ALGO}_bs${BLOCK_SIZE}_$DATA" --gres=gpu:1 --ntasks-per-node=1 scripts/slurm/job.sbatch "${ARGS[@]}"
  else
    echo "=== $ALGO (block size $BLOCK_SIZE) on $DATA"
    "$PYTHON" -u main.py "${ARGS[@]}"
  fi
done
if [ -n "${SLURM:-}" ]; then
  echo "submitted; when the jobs are done: TABLE_ONLY=1 $0 $ALGO $CKPT $BLOCK_SIZE"
  exit 0
fi
# the table: scripts/paper_tables.py (Table 5 layout, the one code path of every paper table)
if [ "${ZS_TABLE:-1}" != 0 ]; then "$PYTHON" scripts/paper_tables.py --table 5 "$OUT"; fi
