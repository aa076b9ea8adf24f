#!/usr/bin/env bash
# Profiling stages for the next device call (one H200); A/B of prototypes is benchmarks/ab_kernel.sh:
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_ab_next.sh [stalls] [sanitize]
#   stalls    benchmarks/gpu_stalls.sh 0.8 1 16 on the checked-out kernels
#   sanitize  benchmarks/gpu_sanitize.sh on the checked-out kernels
# Outputs (logs) under $OUT; the A/B tables are printed.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
export OUT
for stage in "${@:-stalls}"; do
  for s in $stage; do
    echo "=== $s"
    case $s in
      stalls) bash benchmarks/gpu_stalls.sh 0.8 1 16 2>&1 | tee "$OUT/stalls.log" ;;
      sanitize) bash benchmarks/gpu_sanitize.sh 2>&1 | tail -20 ;;
      *) echo "unknown stage $s (stalls sanitize)" >&2; exit 2 ;;
    esac
  done
done
