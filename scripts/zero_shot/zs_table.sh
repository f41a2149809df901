#!/usr/bin/env bash
# The zero-shot table (paper Table 5): AR, SEDD, MDLM and BD3-LM (block size 4) trained on OWT.
#   AR_CKPT=... SEDD_CKPT=... MDLM_CKPT=... BD3LM_CKPT=... \
#       scripts/zero_shot/zs_table.sh [overrides...]
# A model whose *_CKPT is unset is skipped. Extra arguments go to every main.py call
# (e.g. model.attn_backend=flex on a GPU). SLURM=1 submits every (model, data set) as a slurm
# job instead (see zs_ppl.sh); TABLE_ONLY=1 then prints the table. The table of every finished
# run under ${ZS_ROOT:-outputs/zero_shot} is scripts/paper_tables.py --table 5 (Markdown, the
# paper's numbers beside ours).
# With the models of scripts/train/: AR_CKPT=outputs/slurm/owt_ar/checkpoints/last.ckpt,
# SEDD_CKPT=outputs/slurm/owt_sedd/..., MDLM_CKPT=outputs/slurm/owt_mdlm/...,
# BD3LM_CKPT=outputs/slurm/owt_bd3lm_finetune_bs4/checkpoints/last.ckpt.
set -euo pipefail
HERE="$(dirname "$0")"
export ZS_TABLE=0  # one table at the end, not one per model
if [ -n "${AR_CKPT:-}" ]; then "$HERE/zs_ppl.sh" ar "$AR_CKPT" 1 "$@"; fi
if [ -n "${SEDD_CKPT:-}" ]; then "$HERE/zs_ppl.sh" sedd "$SEDD_CKPT" 1024 "$@"; fi
if [ -n "${MDLM_CKPT:-}" ]; then "$HERE/zs_ppl.sh" mdlm "$MDLM_CKPT" 1024 "$@"; fi
if [ -n "${BD3LM_CKPT:-}" ]; then "$HERE/zs_ppl.sh" bd3lm "$BD3LM_CKPT" 4 "$@"; fi
if [ -n "${SLURM:-}" ] && [ -z "${TABLE_ONLY:-}" ]; then exit 0; fi
cd "$HERE/../.."
"${PYTHON:-python}" scripts/paper_tables.py --table 5 "${ZS_ROOT:-outputs/zero_shot}"
