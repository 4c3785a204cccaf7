#!/usr/bin/env bash
# The CPU benchmark table of docs/benchmarks.md: every registered family at the issue's batch sizes
# (64 at 32x32, 8 at 224), fp32 and bf16 autocast eager, and torch.compile (fp32; nest_tiny_cifar also
# bf16) for the models with targets. torch.compile on this CPU costs 1-4 minutes per model and mode.
# Usage: bash scripts/bench_cpu.sh [OUT_DIR]   (default docs/bench; run it alone; 19-31 min on the 2-core AVX-512
# CPU with a warm torch.compile cache; on an AVX2-only CPU the bf16 rows take hours: docs/benchmarks.md)
set -euo pipefail
out=${1:-docs/bench}
mkdir -p "$out"
nb=${NESTVIT:-.venv/bin/nestvit}
common=(--mode both --threads 2 --markdown)
quick=(--warmup 2 --iters 5)
"$nb" bench nest_tiny_cifar "${common[@]}" --dtype fp32,bf16 --compile both --json "$out/nest_tiny_cifar_mqa.json"
"$nb" bench nest_tiny_cifar --set attn=mha "${common[@]}" "${quick[@]}" --dtype fp32,bf16 \
  --json "$out/nest_tiny_cifar_mha.json"
"$nb" bench nest_tiny_cifar --set attn=mha "${common[@]}" "${quick[@]}" --dtype fp32 --compile --no-data \
  --json "$out/nest_tiny_cifar_mha_compile.json"
"$nb" bench nest_tiny_224 tnt_s_patch16_224 rtnt_nano rtnt_tiny "${common[@]}" "${quick[@]}" --dtype fp32,bf16 \
  --json "$out/targets.json"
"$nb" bench nest_tiny_224 tnt_s_patch16_224 rtnt_nano "${common[@]}" "${quick[@]}" --dtype fp32 --compile \
  --no-data --json "$out/targets_compile.json"
"$nb" bench tnt_tiny_patch4_32 vit_tiny_patch4_32 vit_nest_matched_32 deit_tiny_patch16_224 "${common[@]}" \
  "${quick[@]}" --dtype fp32,bf16 --json "$out/baselines.json"
# one table from every JSON file (the rows of docs/benchmarks.md)
"${NESTVIT_PYTHON:-.venv/bin/python}" - "$out"/{baselines,nest_tiny_cifar_mha,nest_tiny_cifar_mha_compile,nest_tiny_cifar_mqa,targets,targets_compile}.json <<'PY'
import json, sys
from nestvit.bench import format_table
rows = [r for f in sys.argv[1:] for r in json.load(open(f))["results"]]
print(format_table(rows, markdown=True))
PY
