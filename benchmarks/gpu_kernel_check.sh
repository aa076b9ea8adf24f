#!/usr/bin/env bash
# One device call for a kernel iteration: GPU test suite, a bitmap benchmark subset, ncu counters of the
# bitmap kernel at 90 % and 50 % (N = 16).  Logs and results go to $OUT (or benchmarks/out).
# Usage: bash benchmarks/gpu_kernel_check.sh [bench-args...]   (default: fp16 bitmap, quick shapes)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "from flash_llm.kernels._build import compile_kernels as c; r=c('sm_90'); print('compiled', len(r.cubin), r.warnings())"
timeout 300 python3 -m pytest -q -x tests/test_kernels_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--quick --dtypes fp16 --formats bitmap --ns 1,16,32,64,128)
python3 benchmarks/bench_spmm.py "${args[@]}" --out "$OUT/spmm" > "$OUT/spmm.log" 2>&1
grep -E "^\|" "$OUT/spmm.log"
for sp in 0.9 0.5; do
  ncu --target-processes all --kernel-name regex:"bitmap_spmm_" --launch-skip 3 --launch-count 1 --clock-control none \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      --metrics smsp__inst_executed.sum,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_fma.sum \
      python3 benchmarks/profile_kernel.py --fmt bitmap --n 16 --sparsity $sp > "$OUT/ncu_bitmap_$sp.txt" 2>&1
  echo "=== ncu bitmap N=16 sparsity $sp (9216 x 36864: $((9216 * 36864 / 1024)) strips)"
  grep -E "plan|Duration|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Issued Warp|No Eligible|inst_executed|pipe_|wavefronts|Registers Per" "$OUT/ncu_bitmap_$sp.txt" | head -24
done
