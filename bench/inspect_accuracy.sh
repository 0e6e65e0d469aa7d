#!/usr/bin/env bash
# How close `infl inspect`'s memory estimate is to the measured peak: for each model, the
# estimate for the job, then `infl fit` and `infl score` under /usr/bin/time -v. Job: the MLP
# layers, 32 sequences of 64 random token ids, 4 queries, batch 8 (ids below 49152, so any of
# the GPT-2, NeoX and Llama vocabularies takes them).
#
#   bench/inspect_accuracy.sh WORKDIR INFL_BIN MODEL [MODEL ...]
#
# MODEL: a checkpoint directory or .gguf file. Prints one row per model; the ratios are
# estimate / measured.
set -euo pipefail
W=$1; BIN=$2; shift 2
mkdir -p "$W"
python3 - "$W" <<'PY'
import json, random, sys
r = random.Random(0)
w = sys.argv[1]
with open(f"{w}/corpus.jsonl", "w") as f:
    for i in range(32):
        f.write(json.dumps({"id": f"s{i}", "ids": [r.randrange(49152) for _ in range(64)]}) + "\n")
with open(f"{w}/queries.jsonl", "w") as f:
    for i in range(4):
        f.write(json.dumps({"id": f"q{i}", "prompt_ids": [r.randrange(49152) for _ in range(12)],
                            "completion_ids": [r.randrange(49152) for _ in range(4)]}) + "\n")
PY
gib() { awk '{printf "%.2f", $1 / 1073741824}'; }
field() { grep "$1" "$2" | awk '{v=$(NF-1); u=$NF; m=(u=="GiB")?1073741824:(u=="MiB")?1048576:1024; printf "%.0f", v*m}'; }
peak() { grep 'Maximum resident' "$1" | awk '{printf "%.0f", $NF * 1024}'; }
printf "%-28s %9s %9s %6s %9s %9s %6s\n" model fit_est fit_peak ratio score_est score_pk ratio
for M in "$@"; do
  name=$(basename "$M"); R=$W/$name; rm -rf "$R"; mkdir -p "$R"
  "$BIN" inspect --model "$M" --modules mlp --batch-size 8 --max-len 64 --no-probe >"$R/inspect.txt" 2>&1
  fe=$(field "FIT TOTAL" "$R/inspect.txt")
  # SCORE TOTAL is printed for one query; the job scores four.
  se=$(( $(field "SCORE TOTAL" "$R/inspect.txt") + 3 * $(field "preconditioned gradients per query" "$R/inspect.txt") ))
  /usr/bin/time -v "$BIN" fit --model "$M" --train "$W/corpus.jsonl" --out "$R/factors" \
    --modules mlp --max-len 64 --batch-size 8 -q 2>"$R/fit.log" >/dev/null
  /usr/bin/time -v "$BIN" score --model "$M" --factors "$R/factors" --train "$W/corpus.jsonl" \
    --queries "$W/queries.jsonl" --out "$R/results" --batch-size 8 -q 2>"$R/score.log" >/dev/null
  fp=$(peak "$R/fit.log"); sp=$(peak "$R/score.log")
  printf "%-28s %9s %9s %6s %9s %9s %6s\n" "$name" "$(echo $fe | gib)" "$(echo $fp | gib)" \
    "$(awk -v a=$fe -v b=$fp 'BEGIN{printf "%.2f", a/b}')" "$(echo $se | gib)" "$(echo $sp | gib)" \
    "$(awk -v a=$se -v b=$sp 'BEGIN{printf "%.2f", a/b}')"
  rm -rf "$R/factors" "$R/results"
done
