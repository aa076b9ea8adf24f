#!/usr/bin/env bash
# Per-source-line instruction counts of one sparse kernel launch (ncu SourceCounters).  Writes to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
fmt=${1:-bitmap}; sp=${2:-0.9}; n=${3:-16}
ncu --target-processes all --kernel-name regex:"_spmm_" --launch-skip 3 --launch-count 1 --import-source yes \
    --section SourceCounters --section InstructionStats --page source --print-source cuda --csv \
    python3 benchmarks/profile_kernel.py --fmt $fmt --n $n --sparsity $sp > "$OUT/src_${fmt}_${sp}.csv" 2>&1
head -c 300 "$OUT/src_${fmt}_${sp}.csv"; echo; wc -l "$OUT/src_${fmt}_${sp}.csv"
