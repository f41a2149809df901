#!/usr/bin/env bash
# Zero-shot likelihood of an OpenWebText-trained model on the paper's suite (SPEC 5.3, Table 5):
# mode=ppl_eval, model.length=1024, loader.eval_batch_size=16, documents concatenated without
# EOS (+data.insert_valid_eos=False), each 1024 chunk BOS + 1022 tokens + EOS.
#
#   scripts/zero_shot/zs_ppl.sh ALGO CHECKPOINT [BLOCK_SIZE] [extra main.py overrides...]
#     ALGO: bd3lm | mdlm | ar       CHECKPOINT: a .ckpt path (or a hub id once hf_dit lands)
#   DATASETS="ptb lambada" scripts/zero_shot/zs_ppl.sh bd3lm ckpt.ckpt 4   # a subset
#   Offline: add data.source=/path/to/<dataset copy> per dataset (see scripts/zero_shot/README.md).
# Results: outputs/zero_shot/<algo>_bs<block>/<dataset>/ppl_eval.json and a summary line each.
set -euo pipefail
cd "$(dirname "$0")/../.."
ALGO=${1:?usage: zs_ppl.sh ALGO CHECKPOINT [BLOCK_SIZE] [overrides...]}
CKPT=${2:?usage: zs_ppl.sh ALGO CHECKPOINT [BLOCK_SIZE] [overrides...]}
BLOCK_SIZE=${3:-4}
shift $(( $# < 3 ? $# : 3 ))
PYTHON=${PYTHON:-python}
DATASETS=${DATASETS:-"ptb wikitext103 lm1b-gpt2 lambada ag_news scientific_papers_pubmed scientific_papers_arxiv"}
case "$ALGO" in
  ar) ALGO_ARGS=(algo=ar) ;;
  mdlm) ALGO_ARGS=(algo=mdlm) ;;
  bd3lm) ALGO_ARGS=(algo=bd3lm block_size="$BLOCK_SIZE") ;;
  *) echo "error: ALGO=$ALGO: use bd3lm, mdlm or ar" >&2; exit 2 ;;
esac
OUT=outputs/zero_shot/${ALGO}_bs${BLOCK_SIZE}
for DATA in $DATASETS; do
  echo "=== $ALGO (block size $BLOCK_SIZE) on $DATA"
  "$PYTHON" -u main.py \
    mode=ppl_eval \
    loader.eval_batch_size=16 \
    model=small \
    "${ALGO_ARGS[@]}" \
    data="$DATA" \
    +data.insert_valid_eos=False \
    model.length=1024 \
    eval.checkpoint_path="$CKPT" \
    wandb=null \
    hydra.run.dir="$OUT/$DATA" \
    "$@"
done
"$PYTHON" - "$OUT" $DATASETS <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
print("dataset".ljust(28), "ppl")
for name in names:
    path = os.path.join(out, name, "ppl_eval.json")
    ppl = json.load(open(path))["ppl"] if os.path.isfile(path) else float("nan")
    print(name.ljust(28), f"{ppl:.2f}")
PY
