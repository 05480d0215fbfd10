#!/usr/bin/env bash
# On a GPU machine: the CPU tier on its torch, the gpu tier (every gpu-marked test), then the
# benchmarks (forward, forward+backward, decode, paged decode).
# Logs go under $OUT; a short table is printed last. Usage: bash scripts/gpu_check.sh [--quick]
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary() { printf '%-14s %s\n' "$1" "$(tail -n 1 "$2")"; }
if [ "${SKIP_CPU_TIER:-0}" != "1" ]; then
  python3 -m pytest -q -p no:cacheprovider -x tests -m "not gpu" > "$OUT/cpu_tier.log" 2>&1
fi
python3 -m pytest -q -p no:cacheprovider -m gpu tests -o addopts="" > "$OUT/gpu_tier.log" 2>&1
python3 benchmarks/bench.py "$@" --out "$OUT" --markdown "$OUT/benchmarks.md" > "$OUT/bench.log" 2>&1
python3 benchmarks/bench.py --backward "$@" --out "$OUT" > "$OUT/bench_backward.log" 2>&1
python3 benchmarks/bench.py --decode --out "$OUT" > "$OUT/bench_decode.log" 2>&1
python3 benchmarks/paged_cases.py > "$OUT/bench_paged.log" 2>&1
echo "==== summary"
[ -f "$OUT/cpu_tier.log" ] && summary "cpu tier" "$OUT/cpu_tier.log"
summary "gpu tier" "$OUT/gpu_tier.log"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tier.log" | head -20
tail -n 25 "$OUT/bench.log"
tail -n 12 "$OUT/bench_backward.log" "$OUT/bench_decode.log" "$OUT/bench_paged.log"
