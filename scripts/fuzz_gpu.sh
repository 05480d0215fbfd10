#!/usr/bin/env bash
# The GPU fuzz profile (tests/test_fuzz.py, docs/reliability.md "Fuzzing"): 1000+ calls as
# three processes started together (360 calls each, seeds SEED, SEED+1, SEED+2), which fits one
# 10-minute run on one GPU; one process alone takes about 12 minutes. Logs under $OUT.
# Usage: [INDUCTOR_FLEX_FUZZ_SEED=...] [SHARDS=3] [CALLS_PER_SHARD=360] bash scripts/fuzz_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
seed=${INDUCTOR_FLEX_FUZZ_SEED:-$RANDOM}
status=0
pids=()
for shard in $(seq 0 $(( ${SHARDS:-3} - 1 ))); do
  INDUCTOR_FLEX_FUZZ_SEED=$(( seed + shard )) INDUCTOR_FLEX_FUZZ_EXAMPLES=${CALLS_PER_SHARD:-360} \
    TORCHINDUCTOR_COMPILE_THREADS=3 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_fuzz.py \
    -k test_fuzz_gpu -o addopts="" > "$OUT/fuzz_gpu_$shard.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
grep -hE "fuzz seed|passed|failed|Falsifying|Error" "$OUT"/fuzz_gpu_*.log | tail -n 20
exit "$status"
