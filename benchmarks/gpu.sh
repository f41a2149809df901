#!/usr/bin/env bash
# Issue 7 GPU benchmarks (< 8 minutes on one H100/H200): needs only torch (no Lightning, Hydra,
# datasets or wandb: the benchmarks import only torch and the model code).
#   1. training at the paper's small shape (width 768, 12 layers, L=1024, batch 16, bf16) for
#      sdpa, flex (compiled block mask) and flash_attn when installed (AR/MDLM only), optimised
#      and baseline side by side: step ms, tokens/s, peak memory, MFU;
#   2. the sampling benchmark (width 128, 1024 tokens, batch 1 and 16, with and without cache).
# Without a GPU it dry-runs the CPU fallback on tiny settings (DRY_RUN=1 forces that).
# Results: $OUT/ (or ./bench_out) train_gpu.json, sample_gpu.json and the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if [[ "${DRY_RUN:-0}" != "1" ]] && $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
  backends=sdpa,flex
  if $PY -c "import flash_attn" 2>/dev/null; then backends=$backends,flash_attn; fi
  timeout 330 $PY benchmarks/train.py --device cuda --shapes small_L1024 --backends "$backends" \
    --bf16 --baseline --reps 5 --json "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train_gpu.log" || true
  timeout 120 $PY benchmarks/sample.py --device cuda --baseline \
    --only bd3lm4_kv_b1_n1024,bd3lm4_kv_b16_n1024,bd3lm16_kv_b1_n1024,bd3lm4_nokv_b1_n1024,ar_kv_b1_n1024 \
    --json "$OUT/sample_gpu.json" 2>&1 | tee "$OUT/sample_gpu.log" || true
else
  echo "no GPU: dry run of the CPU fallback"
  $PY benchmarks/train.py --device cpu --shapes w128_L128 --variants mdlm,bd3lm4 --reps 1 \
    --baseline --no-memory --json "$OUT/train_dry.json"
  $PY benchmarks/sample.py --device cpu --quick \
    --only bd3lm4_kv_b1_n256,ar_kv_b1_n256 --json "$OUT/sample_dry.json"
fi
