#!/usr/bin/env bash
# Session 6, second A/B call (one H200, about 8 minutes): splitk_frag and tcsl_bank_order against the checked-out tree
# on 9216 x 36864 (both formats, 80 %) and on 4096 x 4096 (Tiled-CSL), timed as CUDA-graph replays
# (benchmarks/time_across_n.py); in between, the first GPU-test failure of splitk_frag in full.
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_call_s6b.sh          (logs under $OUT)
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
FMTS="tiled-csl bitmap" SPARSITIES=0.8 NS=1,8,16,32,64 bash benchmarks/ab_kernel.sh benchmarks/ab/splitk_frag.patch \
  benchmarks/ab/tcsl_bank_order.patch > "$OUT/ab_big.log" 2>&1
(cd /tmp/ab_kernel/splitk_frag && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_splitk_frag timeout 120 python3 -m pytest -x -q \
  tests/test_kernels_gpu.py 2>&1 | grep -E "^E |Error|FAILED|passed|failed" | head -40) > "$OUT/splitk_debug.log"
AB_TESTS="tests/test_formats.py -k spreads" FMTS=tiled-csl AB_M=4096 AB_K=4096 SPARSITIES=0.8 NS=1,16,32,64 \
  bash benchmarks/ab_kernel.sh benchmarks/ab/splitk_frag.patch benchmarks/ab/tcsl_bank_order.patch > "$OUT/ab_small.log" 2>&1
cat "$OUT/splitk_debug.log"; grep -v "^$" "$OUT/ab_big.log"; grep "^base\|^splitk\|^tcsl" "$OUT/ab_small.log"
