#!/usr/bin/env bash
# The 1B-class run of docs/scale-out.md#1b: TinyLlama-1.1B's shapes (random weights), every
# linear layer tracked, fitted and scored in layer partitions under a memory limit, each process
# under /usr/bin/time -v and its RSS sampled every 5 s, the GEMM rate read before and after.
#
#   bash bench/run_1b.sh WORKDIR INFL_BINARY [N_SEQUENCES] [MEMORY_LIMIT]
#
# N_SEQUENCES (default 256) windows of 256 random tokens; MEMORY_LIMIT (default 20G) is passed
# to fit and score as --memory-limit. Needs python3 with numpy and safetensors (the model) and
# about 40 GB of disk for the model, the partitions' factors and the joined factors. Prints
# bench/floor_1b.py's table at the end.
set -euo pipefail
work=$1 bin=$(realpath "$2") n=${3:-256} limit=${4:-20G}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work" && cd "$work"
[ -f model/model.safetensors ] || python3 "$here/make_tinyllama_shapes.py" .
head -n "$n" corpus.jsonl > corpus-$n.jsonl

sample_rss() {
  while true; do
    ps -C "$(basename "$bin")" -o pid=,rss=,args= | while read -r pid rss args; do
      echo "$(date +%T) $pid $rss ${args:0:40}"
    done >> rss.log
    sleep 5
  done
}
sample_rss & sampler=$!
trap 'kill $sampler' EXIT

"$bin" bench --engines-only -q > gemm-before.txt
common=(--model model --modules all --max-len 256 --batch-size 2 --memory-limit "$limit")
/usr/bin/time -v "$bin" fit "${common[@]}" --train corpus-$n.jsonl --out factors 2> fit.log
/usr/bin/time -v "$bin" score "${common[@]}" --train corpus-$n.jsonl --queries queries.jsonl \
  --factors factors --out results 2> score.log
"$bin" bench --engines-only -q > gemm-after.txt
python3 "$here/floor_1b.py" model/config.json fit.log score.log gemm-before.txt gemm-after.txt
