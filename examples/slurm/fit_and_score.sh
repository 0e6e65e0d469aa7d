#!/usr/bin/env bash
# Sharded EK-FAC fit and score on a Slurm cluster: job arrays for the passes, dependent jobs
# for the merges. Submit from a login node:
#
#   MODEL=/shared/ckpt TRAIN=/shared/corpus.jsonl QUERIES=/shared/queries.jsonl \
#   OUT=/shared/run1 SHARDS=16 [PARTITIONS=4] bash examples/slurm/fit_and_score.sh
#
# Every path must be on a file system all nodes share. Each array task runs
# `infl ... --shard auto`, which reads SLURM_ARRAY_TASK_ID/MIN/STEP/COUNT; sequence k of the
# corpus belongs to shard k mod N. A task that is preempted or killed resumes from its last
# checkpoint when Slurm requeues it (same command, same --out). With PARTITIONS=P > 1 the
# tracked layers are also split into P layer partitions (models whose factors or query
# gradients exceed a node's memory): the arrays run P × N tasks, task t being partition t / N
# and shard t mod N, and each `infl merge` also joins the partitions.
set -euo pipefail
: "${MODEL:?set MODEL}" "${TRAIN:?set TRAIN}" "${QUERIES:?set QUERIES}" "${OUT:?set OUT}"
SHARDS=${SHARDS:-8}
PARTITIONS=${PARTITIONS:-1}
INFL=${INFL:-infl}
FIT_OPTS=${FIT_OPTS:-"--strategy ekfac --modules mlp --checkpoint-every 2000"}
SCORE_OPTS=${SCORE_OPTS:-"--top-k 100 --checkpoint-every 5000"}
SBATCH_OPTS=${SBATCH_OPTS:-"--cpus-per-task=16 --mem=64G --time=24:00:00 --requeue"}
LAST=$((PARTITIONS * SHARDS - 1))
if [ "$PARTITIONS" -gt 1 ]; then
  # Evaluated by each task's shell: its partition and shard from its array index.
  GRID="--partition \$((SLURM_ARRAY_TASK_ID / $SHARDS))/$PARTITIONS --shard \$((SLURM_ARRAY_TASK_ID % $SHARDS))/$SHARDS"
else
  GRID="--shard auto"
fi

submit() { sbatch --parsable $SBATCH_OPTS "$@"; }

# Round 1 of the fit: covariance sums on every shard, then one merge (eigendecomposition).
cov=$(submit --job-name=infl-cov --array=0-$LAST \
  --wrap="$INFL fit --model $MODEL --train $TRAIN --out $OUT/factors $FIT_OPTS $GRID")
eig=$(submit --job-name=infl-eig --dependency=afterok:$cov \
  --wrap="$INFL merge $OUT/factors")
# Round 2: the eigenvalue (Λ) pass on every shard in the merged eigenbasis, then the final merge.
lam=$(submit --job-name=infl-lambda --dependency=afterok:$eig --array=0-$LAST \
  --wrap="$INFL fit --model $MODEL --train $TRAIN --out $OUT/factors $FIT_OPTS $GRID")
fit=$(submit --job-name=infl-fit-merge --dependency=afterok:$lam \
  --wrap="$INFL merge $OUT/factors")
# Scores: every shard scores its sequences against all queries; the merge reassembles top-k,
# the summaries and (with --dense) the matrix in corpus order.
score=$(submit --job-name=infl-score --dependency=afterok:$fit --array=0-$LAST \
  --wrap="$INFL score --model $MODEL --factors $OUT/factors --train $TRAIN --queries $QUERIES --out $OUT/results $SCORE_OPTS $GRID")
merged=$(submit --job-name=infl-score-merge --dependency=afterok:$score \
  --wrap="$INFL merge $OUT/results && $INFL report $OUT/results --out $OUT/report.html")
echo "submitted: covariance $cov → merge $eig → eigenvalue $lam → merge $fit → score $score → merge $merged"
