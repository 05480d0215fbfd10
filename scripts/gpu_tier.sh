#!/usr/bin/env bash
# The GPU tier (every gpu-marked test but the fuzz profile) in three shards, each sized for one
# 10-minute device call with 8 pytest-xdist workers (without xdist installed it runs serially):
#   1  the backward (tests/test_backward_gpu.py)
#   2  forward, edge cases, errors, dynamic shapes, recompile limit
#   3  decode, paged cache, the pinned fuzz cases
# Usage: bash scripts/gpu_tier.sh 1|2|3|all   (log under $OUT, one PASSED/FAILED line a test)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
shard=${1:-all}
case "$shard" in
  1) files="tests/test_backward_gpu.py" ;;
  2) files="tests/test_gpu.py tests/test_edge_cases.py tests/test_errors.py tests/test_dynamic_shapes.py tests/test_recompile_limit.py" ;;
  3) files="tests/test_decode_gpu.py tests/test_paged_gpu.py tests/test_fuzz.py" ;;
  all) files="tests" ;;
  *) echo "usage: bash scripts/gpu_tier.sh 1|2|3|all" >&2; exit 2 ;;
esac
workers=""
if python3 -c "import xdist" 2>/dev/null; then
  workers="-n ${WORKERS:-8} --dist load"
fi
log="$OUT/gpu_tier_$shard.log"
# shellcheck disable=SC2086  # word splitting of $files and $workers is intended
python3 -m pytest -p no:cacheprovider -m gpu -o addopts="" $files -k "not test_fuzz_gpu" $workers \
  -q -rA --tb=short > "$log" 2>&1
status=$?
# `ERROR tests/...` lines only: Inductor logs autotuning candidates it drops as `ERROR torch._inductor...`.
echo "shard $shard: $(grep -c '^PASSED' "$log") passed, $(grep -c '^FAILED' "$log") failed, $(grep -c '^ERROR tests/' "$log") errors (pytest status $status)"
grep -E "^(FAILED|ERROR tests/)" "$log" | cut -c1-240 | head -n 30
exit $status
