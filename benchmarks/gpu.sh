#!/usr/bin/env bash
# The GPU acceptance run (about 5 minutes on one H100/H200; see benchmarks/acceptance.py for
# the sections): correctness checks first, benchmarks last, $OUT/acceptance.json rewritten
# after every section. Whatever the machine lacks of hydra-core / omegaconf is installed from
# the bundle that benchmarks/gpu_bundle.sh prepares on a CPU machine (BUNDLE, default
# .gpu_bundle), whose caches the sections read (no network, no `datasets` needed).
#   bash benchmarks/gpu.sh            # the GPU run
#   bash benchmarks/gpu.sh --cpu      # the CPU dry run (toy sizes, GPU-only sections skipped)
# The interpreter: $PYTHON, else the project's .venv when there is one (the CPU dry run after
# `make install`), else python3 (the GPU machine's own). BUNDLE and OUT (git-ignored) default
# to .gpu_bundle and bench_out, or for --cpu to a directory under $TMPDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
# the CPU dry run keeps its scratch (bundle data, outputs) outside the tree
case " $* " in
  *" --cpu "*) SCRATCH=${TMPDIR:-/tmp}/bd3lms-gpu-dry-run
               BUNDLE=${BUNDLE:-$SCRATCH/bundle}; OUT=${OUT:-$SCRATCH/out} ;;
  *) BUNDLE=${BUNDLE:-.gpu_bundle}; OUT=${OUT:-bench_out} ;;
esac
mkdir -p "$OUT"
if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
  if [ ! -d "$BUNDLE/wheels" ]; then
    echo "error: hydra-core / omegaconf missing and no bundle at $BUNDLE: run" \
      "benchmarks/gpu_bundle.sh on a CPU machine and bring $BUNDLE along" >&2
    exit 2
  fi
  SITE=${TMPDIR:-/tmp}/bd3lms-site
  $PY -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SITE" "$BUNDLE"/wheels/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY -u benchmarks/acceptance.py --out "$OUT" --bundle "$BUNDLE" "$@" 2>&1 | tee "$OUT/acceptance.log"
exit "${PIPESTATUS[0]}"
