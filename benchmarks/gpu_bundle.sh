#!/usr/bin/env bash
# Prepare, on a CPU machine with the project's .venv and the package registries, the bundle the
# GPU acceptance run needs on a machine without network (benchmarks/gpu.sh installs from it):
#   wheels/  hydra-core and omegaconf (cp312-compatible, pure Python) and antlr4-python3-runtime
#            4.9.3 (omegaconf's pin, which has only a source distribution: built here)
#   cache/   the tokenizer and token caches of the acceptance sections (BD3LMS_CACHE there)
#   judge/   a tiny random GPT-2 judge;  text8/  a synthetic text8 for the text8-crop section
# Usage: bash benchmarks/gpu_bundle.sh [DIR]   (default .gpu_bundle; at most 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=${1:-.gpu_bundle}
mkdir -p "$DIR/wheels"
$PY -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR/wheels" hydra-core==1.3.8 omegaconf==2.3.1
$PY -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DIR/wheels" \
  antlr4-python3-runtime==4.9.3
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
  $PY benchmarks/acceptance.py --prepare "$DIR"
size=$(du -sm "$DIR" | cut -f1)
echo "bundle $DIR: ${size} MiB ($(ls "$DIR/wheels" | tr '\n' ' '))"
if [ "$size" -gt 64 ]; then echo "error: the bundle exceeds 64 MiB" >&2; exit 1; fi
