#!/usr/bin/env bash
# One GPU-host call (see README "Running on a GPU host"): the GPU test suite, the op benchmark and
# a short training-throughput run; logs and bench results land under $OUT.
set -uo pipefail
source .carry/bootstrap.sh >/dev/null
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { local name=$1 limit=$2; shift 2; local t=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; echo "$name rc=$? $((SECONDS - t))s"; }
[ "${SKIP_TESTS:-0}" = 1 ] || step gpu-tests "${TEST_LIMIT:-240}" env MAGIX_GPU_TESTS=1 npx vitest run test/gpu ${TESTS:-}
[ "${SKIP_OPS:-0}" = 1 ] || step ops-gpu 120 env MAGIX_BENCH_REPS=10 npx tsx bench/ops-gpu.ts
[ "${SKIP_TRAIN:-0}" = 1 ] || step train "${TRAIN_LIMIT:-150}" npx tsx bench/train-throughput.ts ${TRAIN_ARGS:---batch 4 --steps 5}
cp bench/results/*.json "$OUT/" 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; grep -E "✓|×|FAIL|Tests|passed|failed|Error|│|tokens|losses|first step" "$f" | grep -v "^ *✓" | tail -40; done
