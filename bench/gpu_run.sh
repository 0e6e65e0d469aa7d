#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, its driver and CUDA 13's libraries (PyTorch's
# pip packages bring them) but no Rust toolchain. Runs from the repository root with the files
# that bench/gpu_build.sh wrote in BUILD (infl.xz, cuda-tests.xz, the kronfluence wheel).
#
#   bash bench/gpu_run.sh --build gpu-build --out OUT [--scale full|small] [--threads N]
#
# 1. tests/cuda.rs: every family's taps on the GPU against the CPU, and fit + score.
# 2. bench/kronfluence_job.py --device cuda: kronfluence and infl on the same job on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_MANIFEST_DIR=$PWD  # where tests/cuda.rs finds the fixtures

build="" out="" scale=full threads=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --scale) scale="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    *) echo "gpu_run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$build" ] && [ -n "$out" ] || { echo "gpu_run.sh: --build DIR and --out DIR are required" >&2; exit 2; }
mkdir -p "$out"
packed=$(cd "$build" && pwd)
build=/tmp/infl-gpu-bin
mkdir -p "$build"
for f in infl cuda-tests; do
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$packed/$f.xz" "$build/$f"
  chmod +x "$build/$f"
done

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# CUDA's libraries where PyTorch's packages put them, and the driver's.
libdirs=$(find / \( -path /proc -o -path /sys \) -prune -o \
  \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \
     -o -name 'libcudart.so.13' -o -name 'libcuda.so.1' \) -print 2>/dev/null |
  xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$build/infl" | grep "not found"; then
  echo "gpu_run.sh: the libraries above are missing (searched: $libdirs)" >&2
  exit 1
fi

# The test binary starts `infl` at the path it was built with.
built_at=$(cat "$packed/infl-path")
mkdir -p "$(dirname "$built_at")"
cp "$build/infl" "$built_at"
tests_rc=0
"$build/cuda-tests" --test-threads 1 --nocapture 2>&1 | tee "$out/cuda-tests.log" || tests_rc=$?

# kronfluence against infl, both on the GPU.
if ls "$packed"/kronfluence-*.whl >/dev/null 2>&1; then
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --target /tmp/kf-site \
    "$packed"/kronfluence-*.whl
  export PYTHONPATH=/tmp/kf-site${PYTHONPATH:+:$PYTHONPATH}
fi
PYTHONUNBUFFERED=1 python3 bench/kronfluence_job.py --scale "$scale" --out /tmp/infl-gpu-job \
  --infl "$build/infl" --threads "$threads" --device cuda 2>&1 | tee "$out/kronfluence-gpu.log"
cp /tmp/infl-gpu-job/bench.json "$out/bench-gpu.json"
if [ "$tests_rc" -ne 0 ]; then
  echo "gpu_run.sh: tests/cuda.rs failed (exit $tests_rc); see $out/cuda-tests.log" >&2
  exit "$tests_rc"
fi
