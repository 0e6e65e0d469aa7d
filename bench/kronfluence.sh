#!/usr/bin/env bash
# infl against kronfluence on the same CPU job (see kronfluence_job.py for the job and the
# conventions). Installs torch (CPU), transformers and kronfluence into a throwaway
# virtualenv unless INFL_BENCH_VENV names one that has them; builds infl in release unless
# INFL_BIN names a binary.
#
#   bash bench/kronfluence.sh [--scale small|full] [--out DIR] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=full; OUT=""; THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE=$2; shift 2;;
    --out) OUT=$2; shift 2;;
    --threads) THREADS=$2; shift 2;;
    *) echo "usage: $0 [--scale small|full] [--out DIR] [--threads N]" >&2; exit 2;;
  esac
done
OUT=${OUT:-$(mktemp -d -t infl-bench-XXXX)}
VENV=${INFL_BENCH_VENV:-}
if [ -z "$VENV" ]; then
  VENV=$(mktemp -d -t infl-bench-venv-XXXX)
  trap 'rm -rf "$VENV"' EXIT
  python3 -m venv "$VENV"
  # The CPU-only wheel (~200 MB) where PyTorch's index is reachable; otherwise PyPI's wheel,
  # which brings CUDA libraries (~7 GB) that this CPU job never loads.
  "$VENV/bin/pip" install -q --index-url https://download.pytorch.org/whl/cpu torch==2.9.1 ||
    "$VENV/bin/pip" install -q torch==2.9.1
  "$VENV/bin/pip" install -q transformers==4.57.1 kronfluence==1.0.1 safetensors numpy
fi
if [ -z "${INFL_BIN:-}" ]; then
  cargo build --release --locked
  INFL_BIN=target/release/infl
fi
OMP_NUM_THREADS=$THREADS "$VENV/bin/python" bench/kronfluence_job.py \
  --scale "$SCALE" --out "$OUT" --infl "$INFL_BIN" --threads "$THREADS"
echo "results: $OUT/bench.json"
