#!/usr/bin/env bash
# Tiled-CSL above 256 tokens: the sparse kernel forced (`_wg128x4` over 128-token chunks) against the dispatched path
# (the expanded weight and cuBLAS), one GPU, same process per pair:
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_wg_above_256.sh
# $WG_SHAPES (default four large layers of bench_spmm.py), $WG_SPARSITIES (default "0.8 0.9"), N = $WG_NS (default 384).
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for shape in ${WG_SHAPES:-28672x4096 8192x28672 36864x12288 12288x49152}; do
  m=${shape%x*}; k=${shape#*x}
  for sp in ${WG_SPARSITIES:-0.8 0.9}; do
    for v in sparse:--force-sparse dispatch:; do
      IFS=: read -r name force <<<"$v"
      # shellcheck disable=SC2086
      timeout 100 python3 benchmarks/time_across_n.py --fmt tiled-csl --m "$m" --k "$k" --sparsity "$sp" \
        --ns "${WG_NS:-384}" $force | grep "^| [0-9]" | sed "s/^/$name $shape $sp /"
    done
  done
done 2>&1 | tee "$OUT/above256.log"
