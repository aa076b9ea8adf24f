#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over flash-llm's own kernels only (benchmarks/profile_kernel.py:
# both formats, split-K off and on, both decoders to dense), small shapes.
# CFGS (default "bitmap:1 bitmap:3 tiled-csl:1 tiled-csl:3", format:splits) picks the spmm runs.  Output under
# $OUT/sanitize.log.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
# compile the cubin into the cache first: compiled under memcheck, the first run can pass its 120 s (session 7:
# an empty memcheck line)
python3 benchmarks/profile_kernel.py --fmt bitmap --m 200 --k 1000 --n 3 --sparsity 0.9 --iters 1 >/dev/null 2>&1
for tool in memcheck racecheck; do
  for cfg in ${CFGS:-bitmap:1 bitmap:3 tiled-csl:1 tiled-csl:3}; do
    set -- "${cfg%%:*}" "${cfg##*:}"
    for sp in 0.5 0.9; do
      n=$([ $sp = 0.5 ] && echo 17 || echo 3)  # NT = 4 and NT = 1
      r=$(timeout 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 \
          python3 benchmarks/profile_kernel.py --fmt $1 --m 200 --k 1000 --n $n --sparsity $sp --splits $2 --iters 2 2>&1 | \
          grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|max err" | tr '\n' ' ')
      echo "$tool $1 splits=$2 sparsity=$sp N=$n: $r" | tee -a "$OUT/sanitize.log"
    done
  done
  for fmt in bitmap tiled-csl; do  # the decoders of the large-N path
    r=$(timeout 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 \
        python3 benchmarks/profile_kernel.py --fmt $fmt --m 200 --k 1000 --sparsity 0.7 --decode --iters 2 2>&1 | \
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|max err" | tr '\n' ' ')
    echo "$tool $fmt decode sparsity=0.7: $r" | tee -a "$OUT/sanitize.log"
  done
done
