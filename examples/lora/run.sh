#!/usr/bin/env bash
# Recipe: fine-tune a LoRA adapter on a corpus with planted facts, then find the facts with
# `infl --adapter`. Run from the repository root after `cargo build --release`.
#   PYTHON=/path/to/python-with-peft examples/lora/run.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-/tmp/infl-lora-recipe}
PY=${PYTHON:-python3}
BASE=tests/fixtures/families/llama
INFL=target/release/infl
"$PY" examples/lora/train_adapter.py "$OUT"
"$INFL" fit --model "$BASE" --adapter "$OUT/adapter" --modules adapter \
  --train "$OUT/corpus.jsonl" --fisher empirical --out "$OUT/factors"
"$INFL" score --model "$BASE" --adapter "$OUT/adapter" --factors "$OUT/factors" \
  --train "$OUT/corpus.jsonl" --queries "$OUT/queries.jsonl" --top-k 3 --out "$OUT/results"
echo "planted fact sequences (line: fact): $(cat "$OUT/planted.json")"
