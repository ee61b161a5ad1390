#!/usr/bin/env bash
# Training throughput side by side on one GPU, in one call: PyTorch + transformers eager and
# torch.compile, JAX, then Magix (which prints the joint table and writes the JSON under
# bench/results/). A baseline that fails (out of memory, say) shows as failed, with its log.
#   BATCH=8 STEPS=10 bash bench/train-compare.sh        (logs under $OUT or /tmp/train-compare)
set -uo pipefail
B=${BATCH:-8} STEPS=${STEPS:-10} T=${SEQ:-2048}
logs=${OUT:-/tmp/train-compare}; mkdir -p "$logs"
run() { local name=$1; shift; local t=$SECONDS
  timeout "${LIMIT:-240}" "$@" >"$logs/$name-b$B.log" 2>&1; echo "$name batch $B: rc=$? $((SECONDS - t)) s" >&2; }
[ "${SKIP_TORCH:-0}" = 1 ] || run torch-eager python3 bench/baselines/torch_train.py --batch "$B" --seq "$T" --steps "$STEPS" --out "$logs/torch-eager-b$B.json"
[ "${SKIP_TORCH:-0}" = 1 ] || run torch-compile python3 bench/baselines/torch_train.py --batch "$B" --seq "$T" --steps "$STEPS" --compile --out "$logs/torch-compile-b$B.json"
[ "${SKIP_JAX:-0}" = 1 ] || run jax python3 bench/baselines/jax_train.py --batch "$B" --seq "$T" --steps "$STEPS" --out "$logs/jax-b$B.json"
with=""
for f in torch-eager torch-compile jax; do
  case "$f" in torch-*) [ "${SKIP_TORCH:-0}" = 1 ] && continue ;; jax) [ "${SKIP_JAX:-0}" = 1 ] && continue ;; esac
  with="$with${with:+,}$logs/$f-b$B.json"
done
npx tsx bench/train-throughput.ts --batch "$B" --seq "$T" --steps "${MAGIX_STEPS:-$STEPS}" ${with:+--with "$with"}
