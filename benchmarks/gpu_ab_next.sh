#!/usr/bin/env bash
# The device call prepared for the prototypes in benchmarks/ab/ (one H200; l2 + decoder about 5 minutes,
# splitk + stalls about 6: two calls):
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_ab_next.sh [l2] [decoder] [splitk] [stalls] [sanitize]
#   l2        tcsl_l2_prefetch against the checked-out Tiled-CSL kernel (N = 1-64, 80 and 90 %)
#   decoder   tcsl_decoder_smem at N = 128-512 (the Tiled-CSL large-N path), 80 %
#   splitk    splitk_reduce_vec, both formats, 80 %: on 4096 x 4096 (Llama-3-8B o) and on 9216 x 36864
#   stalls    benchmarks/gpu_stalls.sh 0.8 1 16 on the checked-out kernels
#   sanitize  benchmarks/gpu_sanitize.sh on the checked-out kernels
# Outputs (logs) under $OUT; the A/B tables are printed.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
export OUT
for stage in "${@:-l2 decoder splitk}"; do
  for s in $stage; do
    echo "=== $s"
    case $s in
      l2) FMTS=tiled-csl bash benchmarks/ab_kernel.sh benchmarks/ab/tcsl_l2_prefetch.patch 2>&1 | tee "$OUT/ab_l2.log" ;;
      decoder) FMTS=tiled-csl SPARSITIES=0.8 NS=128,256,512 bash benchmarks/ab_kernel.sh \
                 benchmarks/ab/tcsl_decoder_smem.patch 2>&1 | tee "$OUT/ab_decoder.log" ;;
      splitk) { AB_M=4096 AB_K=4096 SPARSITIES=0.8 NS=1,16,32,64 bash benchmarks/ab_kernel.sh \
                  benchmarks/ab/splitk_reduce_vec.patch
                AB_TESTS=tests/test_kernels_gpu.py SPARSITIES=0.8 NS=16,32,64 bash benchmarks/ab_kernel.sh \
                  benchmarks/ab/splitk_reduce_vec.patch; } 2>&1 | tee "$OUT/ab_splitk.log" ;;
      stalls) bash benchmarks/gpu_stalls.sh 0.8 1 16 2>&1 | tee "$OUT/stalls.log" ;;
      sanitize) bash benchmarks/gpu_sanitize.sh 2>&1 | tail -20 ;;
      *) echo "unknown stage $s (l2 decoder splitk stalls sanitize)" >&2; exit 2 ;;
    esac
  done
done
