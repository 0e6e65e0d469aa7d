#!/usr/bin/env bash
# Recipe: does influence cross languages more as the model grows? (docs/cross_lingual.md)
# Builds a bilingual corpus (English + a word-level cipher translation, every sequence in one
# language), trains three GPT-2 sizes on it with `infl train`, fits EK-FAC, scores every fact
# query in both languages against every training sequence (--dense), and measures per size how
# much of each query's influence comes from the other language's statements of the same fact.
# Run from the repository root after `cargo build --release`:
#   examples/cross_lingual/run.sh [OUT_DIR]          (default /tmp/infl-cross-lingual)
# Environment: INFL (the binary, default target/release/infl), EPOCHS (default 30), THREADS
# (passed as --threads when set), SIZES (default "s:32:1:2 m:64:2:4 l:128:3:4",
# name:n_embd:n_layer:n_head[:epochs]), KEEP_NAMES=1 (the control: entity names left untranslated).
set -euo pipefail
OUT=${1:-/tmp/infl-cross-lingual}
INFL=${INFL:-target/release/infl}
EPOCHS=${EPOCHS:-30}
SIZES=${SIZES:-"s:32:1:2 m:64:2:4 l:128:3:4"}
HERE=$(dirname "$0")
threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi

corpus_args=()
if [ -n "${KEEP_NAMES:-}" ]; then corpus_args=(--keep-names); fi
python3 "$HERE/make_corpus.py" "$OUT/data" "${corpus_args[@]}"
tokenizer=()
names=()
for spec in $SIZES; do
  IFS=: read -r name embd layers heads epochs <<<"$spec"
  names+=("$name")
  dir="$OUT/$name"
  start=$SECONDS
  # Every size reads the corpus through the same tokenizer (trained with the first size), so the
  # sizes differ only in the model.
  "$INFL" "${threads[@]}" -q train --train "$OUT/data/corpus.jsonl" --out "$dir/model" --overwrite \
    --n-embd "$embd" --n-layer "$layers" --n-head "$heads" --n-positions 64 --epochs "${epochs:-$EPOCHS}" \
    "${tokenizer[@]}"
  tokenizer=(--tokenizer "$OUT/${names[0]}/model/tokenizer.json")
  "$INFL" "${threads[@]}" -q fit --model "$dir/model" --train "$OUT/data/corpus.jsonl" \
    --out "$dir/factors" --overwrite
  "$INFL" "${threads[@]}" -q score --model "$dir/model" --factors "$dir/factors" \
    --train "$OUT/data/corpus.jsonl" --queries "$OUT/data/queries.jsonl" --dense --top-k 5 --query-rank full \
    --out "$dir/results" --overwrite
  echo "size $name (n_embd $embd, $layers layers, $heads heads): trained, fitted and scored in $((SECONDS - start)) s"
done
python3 "$HERE/analyze.py" "$OUT" "${names[@]}"
