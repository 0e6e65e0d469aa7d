#!/usr/bin/env bash
# The Python package's proof, from a clean clone: builds the wheel (maturin, release), installs
# it into a fresh virtualenv with numpy, pandas and pytest from PyPI, builds the `infl` binary
# the parity tests compare with, runs python/tests and examples/python/quickstart.py.
# Usage: python/run-tests.sh [pytest args]. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${INFL_PY_WORK:-target/python}
rm -rf "$WORK/venv" "$WORK/wheels" "$WORK/quickstart"
mkdir -p "$WORK"

"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet "maturin>=1.5,<2" numpy pandas pytest

# The binary the parity tests compare with (already built when cargo test --release ran).
cargo build --release --locked --bin infl
"$WORK/venv/bin/maturin" build --release --locked --interpreter "$VPY" --out "$WORK/wheels"
"$VPY" -m pip install --quiet --force-reinstall --no-deps "$WORK"/wheels/infl-*.whl

# From outside the source tree, so the installed package is what is tested.
ROOT=$PWD
cd "$WORK"
INFL_BIN="$ROOT/target/release/infl" "$ROOT/$VPY" -m pytest -q "$ROOT/python/tests" "$@"
"$ROOT/$VPY" "$ROOT/examples/python/quickstart.py" --out "$ROOT/$WORK/quickstart"
