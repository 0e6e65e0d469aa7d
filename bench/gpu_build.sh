#!/usr/bin/env bash
# Builds `infl` with `--features cuda` on a machine with no GPU and no CUDA installed, for a GPU
# machine that has the driver and CUDA's libraries but no Rust toolchain (bench/gpu_run.sh runs
# it there). What it needs comes from PyPI: CUDA 13.0's nvcc and headers (the PTX of candle's
# kernels is built for one compute capability: --cap, 90 for Hopper). The program links against
# CUDA's libraries by name; link-time stand-ins are generated here for the driver, cuBLAS,
# cuRAND and NVRTC (their functions as empty symbols, with the real libraries' sonames), so
# nothing of them is downloaded: at run time the loader takes the GPU machine's real ones.
#
#   bash bench/gpu_build.sh --out gpu-build [--cap 90] [--work /tmp/infl-cuda]
#
# Writes OUT/infl.xz and OUT/cuda-tests.xz (stripped, then compressed: the kernels' PTX makes
# each binary about 60 MB, 6–9 MB once compressed), OUT/infl-path (where the test binary looks
# for infl) and the kronfluence wheel that bench/gpu_run.sh installs there.
set -euo pipefail
cd "$(dirname "$0")/.."

out="" cap=90 work=/tmp/infl-cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --cap) cap="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    *) echo "gpu_build.sh: unknown argument $1 (use --out DIR [--cap N] [--work DIR])" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "gpu_build.sh: --out DIR is required" >&2; exit 2; }
mkdir -p "$work" "$out"

cuda="$work/toolkit/nvidia/cu13"
if [ ! -x "$cuda/bin/nvcc" ]; then
  echo "fetching CUDA 13.0's compiler and headers from PyPI" >&2
  python3 -m pip download -q --no-deps -d "$work/wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
  mkdir -p "$work/toolkit"
  for w in "$work"/wheels/*.whl; do (cd "$work/toolkit" && python3 -m zipfile -e "$w" .); done
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/* 2>/dev/null || true
fi

stubs="$work/stubs"
build() {
  CUDA_ROOT="$cuda" CUDA_COMPUTE_CAP="$cap" PATH="$cuda/bin:$PATH" \
    RUSTFLAGS="-L native=$stubs" \
    cargo "$@" --release --locked --features cuda --target-dir "$work/target"
}

# The stand-ins list every CUDA function that cudarc's compiled code refers to, so the first
# build compiles everything but the final link, which needs them.
mkdir -p "$stubs"
ln -sf "$cuda/lib/libcudart.so.13" "$stubs/libcudart.so"
if [ ! -e "$stubs/libcuda.so" ]; then
  build build --bin infl 2>/dev/null || true
  rlib=$(ls "$work"/target/release/deps/libcudarc-*.rlib | head -n 1)
  nm -u "$rlib" | awk '$1 == "U" {print $2}' | sort -u >"$stubs/symbols.txt"
  make_stub() { # library soname prefix-regex
    local lib=$1 soname=$2 pattern=$3
    grep -E "$pattern" "$stubs/symbols.txt" | sed 's/.*/void &(void) {}/' >"$stubs/$lib.c"
    cc -shared -fPIC -Wl,-soname,"$soname" -o "$stubs/$soname" "$stubs/$lib.c"
    ln -sf "$soname" "$stubs/$lib.so"
  }
  make_stub libcublasLt libcublasLt.so.13 '^cublasLt'
  make_stub libcublas libcublas.so.13 '^cublas[^L]|^cublas$'
  make_stub libcurand libcurand.so.10 '^curand'
  make_stub libnvrtc libnvrtc.so.13 '^nvrtc'
  make_stub libcuda libcuda.so.1 '^cu[A-Z]'
fi

build build --bin infl
build test --test cuda --no-run 2>&1 | tee "$work/test-build.log" >&2
test_bin=$(grep -o 'target/release/deps/cuda-[0-9a-f]*' "$work/test-build.log" | tail -n 1)
cp "$work/target/release/infl" "$out/infl"
cp "$work/$test_bin" "$out/cuda-tests"
strip "$out/infl" "$out/cuda-tests"
xz -9 -T2 -f "$out/infl" "$out/cuda-tests"
# The test binary starts `infl` at the path it was built with (cargo's CARGO_BIN_EXE_infl).
echo "$work/target/release/infl" >"$out/infl-path"
python3 -m pip download -q --no-deps -d "$out" kronfluence==1.0.1
echo "built $out/infl.xz and $out/cuda-tests.xz for compute capability $cap" >&2
ls -la "$out" >&2
