#!/usr/bin/env bash
# ncu summary + SASS of the sparse kernels (device machine).  Writes to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
python3 -c "from flash_llm.kernels._build import compile_kernels as c; open('/tmp/k.cubin','wb').write(c('sm_90', use_cache=False).cubin)"
cuobjdump -sass /tmp/k.cubin > "$OUT/sass.txt" 2>&1
for fn in bitmap_spmm_f16_nt1 bitmap_spmm_f16_nt2 tiled_csl_spmm_f16_nt2; do
  awk -v f="$fn" '/Function :/{p=($3==f)} p' "$OUT/sass.txt" > "$OUT/sass_$fn.txt"
  echo "$fn: $(wc -l < "$OUT/sass_$fn.txt") lines, LDS $(grep -c 'LDS' "$OUT/sass_$fn.txt"), BRA $(grep -c 'BRA' "$OUT/sass_$fn.txt"), HMMA $(grep -c 'HMMA' "$OUT/sass_$fn.txt"), SHFL $(grep -c SHFL "$OUT/sass_$fn.txt"), BSSY $(grep -c BSSY "$OUT/sass_$fn.txt")"
done
for cfg in "bitmap 16 0.9" "bitmap 16 0.5" "tiled-csl 16 0.9"; do
  set -- $cfg
  ncu --target-processes all --kernel-name regex:"_spmm_" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats --metrics smsp__inst_executed.sum \
      python3 benchmarks/profile_kernel.py --fmt $1 --n $2 --sparsity $3 > "$OUT/ncu_$1_$3.txt" 2>&1
  echo "=== ncu $cfg"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Issued Warp|No Eligible|Stall|Waves Per SM|plan|inst_executed" "$OUT/ncu_$1_$3.txt" | head -30
done
