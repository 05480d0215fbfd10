#!/usr/bin/env bash
# Every Triton template (forward, backward, decode, paged) on small ragged shapes under
# compute-sanitizer's memcheck. Needs a CUDA GPU and compute-sanitizer on the PATH (or in
# /usr/local/cuda/bin). Usage: bash scripts/memcheck.sh  (log under $OUT or gpu_results/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Every tensor its own allocation: with the caching allocator an access past one tensor that
# lands inside another of the same segment is not reported.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
# Compile in this process (no compile workers to instrument), and compile once without the
# sanitizer first so the checked run loads cached kernels instead of compiling under it.
export TORCHINDUCTOR_COMPILE_THREADS=1
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
python3 scripts/memcheck.py > "$OUT/memcheck_warm.log" 2>&1 || { echo "warm-up run failed"; tail -20 "$OUT/memcheck_warm.log"; exit 1; }
"$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 20 python3 scripts/memcheck.py > "$OUT/memcheck.log" 2>&1
status=$?
grep -E "ERROR SUMMARY|^ok" "$OUT/memcheck.log" | tail -n 30
echo "memcheck exit status: $status"
exit $status
