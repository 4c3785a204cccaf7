#!/usr/bin/env bash
# Reruns every experiment of docs/results.md with the arguments that page reports, one after the other, with logs, then
# copies the plots to docs/img/. Usage (from the repository root):
#   nohup experiments/results/run_all.sh > experiments/results/run_all.log 2>&1 &
# Outputs: runs/experiments/NAME/{results.json,results.md,results.png,runs/}.
# Run it alone: on a CPU shared with other jobs, OpenMP threads wait for each other (see docs/results.md).
set -u
cd "$(dirname "$0")/../.."
NV=${NESTVIT:-.venv/bin/nestvit}
export PYTHONUNBUFFERED=1
for cmd in \
  "rtnt_vs_tnt --threads 2" \
  "aggregation --threads 2 --all-variants" \
  "hierarchy --threads 2 --all-variants" \
  "data_efficiency --threads 2" \
  "best_fashion_mnist --seeds 0 1 2 --threads 2"; do
  name=${cmd%% *}
  echo "=== $(date +%T) nestvit experiment $cmd"
  start=$(date +%s)
  # shellcheck disable=SC2086
  $NV experiment $cmd > "experiments/results/$name.log" 2>&1
  echo "=== $(date +%T) $name: rc $? in $(( $(date +%s) - start )) s"
  [ -f "runs/experiments/$name/results.png" ] && cp "runs/experiments/$name/results.png" "docs/img/results_$name.png"
done
