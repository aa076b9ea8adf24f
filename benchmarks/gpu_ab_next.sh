#!/usr/bin/env bash
# The next device call (one H200):
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_ab_next.sh [tests] [ab] [stalls] [sanitize]
#   tests     the GPU kernel tests on the checked-out tree (session 6 applied the NT = 1 clear by scatter compiled,
#             not run in its final form; about 1 minute)
#   ab        the prototypes waiting in benchmarks/ab/ (about 6 minutes): splitk_reduce_wide and tcsl_inkernel_n1,
#             Tiled-CSL on 9216 x 36864 at 80 and 90 %, N = 1-32, then on 4096 x 14336 (Llama-3-8B down)
#   stalls    benchmarks/gpu_stalls.sh 0.8 1 16 on the checked-out kernels
#   sanitize  benchmarks/gpu_sanitize.sh on the checked-out kernels
# Outputs (logs) under $OUT; the A/B tables are printed.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
export OUT
for stage in "${@:-tests ab}"; do
  for s in $stage; do
    echo "=== $s"
    case $s in
      ab) { FMTS=tiled-csl SPARSITIES="0.8 0.9" NS=1,8,16,32 bash benchmarks/ab_kernel.sh benchmarks/ab/splitk_reduce_wide.patch \
               benchmarks/ab/tcsl_inkernel_n1.patch
             AB_TESTS="tests/test_plan.py" FMTS=tiled-csl AB_M=4096 AB_K=14336 SPARSITIES=0.8 NS=1,8,16,32 \
               bash benchmarks/ab_kernel.sh benchmarks/ab/splitk_reduce_wide.patch benchmarks/ab/tcsl_inkernel_n1.patch
           } 2>&1 | tee "$OUT/ab.log" ;;
      tests) PYTHONPATH=$PWD timeout 200 python3 -m pytest -q tests/test_kernels_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -3 ;;
      stalls) bash benchmarks/gpu_stalls.sh 0.8 1 16 2>&1 | tee "$OUT/stalls.log" ;;
      sanitize) bash benchmarks/gpu_sanitize.sh 2>&1 | tail -20 ;;
      *) echo "unknown stage $s (tests ab stalls sanitize)" >&2; exit 2 ;;
    esac
  done
done
