#!/usr/bin/env bash
# Executed instructions per SASS instruction of one bitmap kernel launch (ncu SourceCounters, SASS page).
# Usage: bash benchmarks/gpu_source_counts.sh [sparsity] [n]   -> $OUT/sass_counts_<sparsity>.csv
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
sp=${1:-0.9}; n=${2:-16}
ncu --target-processes all --kernel-name regex:"bitmap_spmm_" --launch-skip 3 --launch-count 1 --clock-control none \
    --section SourceCounters --page source --print-source sass --csv \
    python3 benchmarks/profile_kernel.py --fmt bitmap --n $n --sparsity $sp > "$OUT/sass_counts_$sp.csv" 2>&1
wc -l "$OUT/sass_counts_$sp.csv"; head -c 600 "$OUT/sass_counts_$sp.csv"; echo
