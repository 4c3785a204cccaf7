#!/usr/bin/env bash
# Reruns every experiment of docs/results.md in its default mode, one after the other, with logs.
#   nohup experiments/results/run_all.sh > experiments/results/run_all.log 2>&1 &
# Each command below is also the one docs/results.md quotes; outputs go to runs/experiments/NAME.
set -u
cd "$(dirname "$0")/../.."
NV=${NESTVIT:-.venv/bin/nestvit}
export PYTHONUNBUFFERED=1
for cmd in \
  "rtnt_vs_tnt" \
  "aggregation" \
  "hierarchy" \
  "data_efficiency" \
  "best_fashion_mnist --budget-min 60"; do
  name=${cmd%% *}
  echo "=== $(date +%T) nestvit experiment $cmd"
  start=$(date +%s)
  # shellcheck disable=SC2086
  $NV experiment $cmd > "experiments/results/$name.log" 2>&1
  echo "=== $(date +%T) $name: rc $? in $(( $(date +%s) - start )) s"
done
