#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over flash-llm's own kernels only (benchmarks/profile_kernel.py:
# both formats, split-K off and on, a decode to dense), small shapes.  Output under $OUT/sanitize.log.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
for tool in memcheck racecheck; do
  for cfg in "bitmap 1" "bitmap 3" "tiled-csl 1" "tiled-csl 3"; do
    set -- $cfg
    for sp in 0.5 0.9; do
      r=$(timeout 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 \
          python3 benchmarks/profile_kernel.py --fmt $1 --m 200 --k 1000 --n 17 --sparsity $sp --splits $2 --iters 2 2>&1 | \
          grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|max err" | tr '\n' ' ')
      echo "$tool $1 splits=$2 sparsity=$sp: $r" | tee -a "$OUT/sanitize.log"
    done
  done
done
