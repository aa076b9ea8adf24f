#!/usr/bin/env bash
# The device call prepared for the prototypes in benchmarks/ab/ (one H200; splitk about 6 minutes):
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_ab_next.sh [splitk] [stalls] [sanitize]
#   splitk    splitk_frag, both formats, 80 %: on 4096 x 4096 (Llama-3-8B o) and on 9216 x 36864
#   stalls    benchmarks/gpu_stalls.sh 0.8 1 16 on the checked-out kernels
#   sanitize  benchmarks/gpu_sanitize.sh on the checked-out kernels
# Outputs (logs) under $OUT; the A/B tables are printed.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
export OUT
for stage in "${@:-splitk}"; do
  for s in $stage; do
    echo "=== $s"
    case $s in
      splitk) { AB_M=4096 AB_K=4096 SPARSITIES=0.8 NS=1,8,16,32,64 bash benchmarks/ab_kernel.sh \
                  benchmarks/ab/splitk_frag.patch
                AB_TESTS="tests/test_kernels_gpu.py tests/test_engine_gpu.py" SPARSITIES=0.8 NS=1,8,16,32,64 \
                  bash benchmarks/ab_kernel.sh benchmarks/ab/splitk_frag.patch; } 2>&1 | tee "$OUT/ab_splitk.log" ;;
      stalls) bash benchmarks/gpu_stalls.sh 0.8 1 16 2>&1 | tee "$OUT/stalls.log" ;;
      sanitize) bash benchmarks/gpu_sanitize.sh 2>&1 | tail -20 ;;
      *) echo "unknown stage $s (splitk stalls sanitize)" >&2; exit 2 ;;
    esac
  done
done
