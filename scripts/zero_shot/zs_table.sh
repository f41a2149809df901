#!/usr/bin/env bash
# The zero-shot table (paper Table 5): AR, MDLM and BD3-LM (block size 4) trained on OWT.
#   AR_CKPT=... MDLM_CKPT=... BD3LM_CKPT=... scripts/zero_shot/zs_table.sh [overrides...]
# A model whose *_CKPT is unset is skipped. Extra arguments go to every main.py call
# (e.g. model.attn_backend=sdpa on a machine without flex).
set -euo pipefail
HERE="$(dirname "$0")"
[ -n "${AR_CKPT:-}" ] && "$HERE/zs_ppl.sh" ar "$AR_CKPT" 1 "$@"
[ -n "${MDLM_CKPT:-}" ] && "$HERE/zs_ppl.sh" mdlm "$MDLM_CKPT" 1024 "$@"
[ -n "${BD3LM_CKPT:-}" ] && "$HERE/zs_ppl.sh" bd3lm "$BD3LM_CKPT" 4 "$@"
exit 0
