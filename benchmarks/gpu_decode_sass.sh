#!/usr/bin/env bash
# Where the batch-1 DeltaRows kernels' warps wait, by SASS instruction (session 70's method, for issue 4's 80 % of the
# floor): Nsight Compute's warp-stall sampling on one launch of each of Llama-3-8B's projections at 80 % (bf16, coded
# values, N = 1, as the batch-1 engine lays them out: q/k/v 16 lanes a row, gate / up 4, down the split layout), each
# summarized by benchmarks/diag/ncu_source_top.py (the instructions with the most samples, their two largest stall
# reasons, two instructions before each).  One GPU, about 3 minutes.
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_decode_sass.sh      (outputs under $OUT: src_<layer>.csv, top_<layer>.txt)
# The launches run alone (profile_kernel.py), not inside a decode step: no programmatic overlap with the kernel before.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=${FLASH_LLM_CACHE:-/tmp/flc}
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
while read -r name m k parts; do
  timeout 150 ncu --target-processes all --kernel-name regex:"delta_rows_(parts|spmm)" --launch-skip 3 --launch-count 1 \
    --clock-control none --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
    python3 benchmarks/profile_kernel.py --fmt delta-rows --m "$m" --k "$k" --n 1 --sparsity 0.8 --dtype bf16 --coded \
    --parts "$parts" > "$OUT/src_$name.csv" 2>&1
  echo "=== $name ($m x $k, $parts lanes a row)"
  python3 benchmarks/diag/ncu_source_top.py "$OUT/src_$name.csv" --top 12 --context 2 | tee "$OUT/top_$name.txt"
done <<'SHAPES'
qkv 6144 4096 16
gateup 28672 4096 4
down 4096 14336 1
SHAPES
