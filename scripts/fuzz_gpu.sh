#!/usr/bin/env bash
# The GPU fuzz profile alone (tests/test_fuzz.py, docs/reliability.md "Fuzzing"); log under $OUT.
# Usage: [INDUCTOR_FLEX_FUZZ_EXAMPLES=1000] [INDUCTOR_FLEX_FUZZ_SEED=...] bash scripts/fuzz_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_fuzz.py -o addopts="" > "$OUT/fuzz_gpu.log" 2>&1
status=$?
grep -E "seed|passed|failed|Falsifying|Error" "$OUT/fuzz_gpu.log" | tail -n 20
exit "$status"
