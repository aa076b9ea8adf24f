#!/usr/bin/env bash
# The closing device call of a kernel session (one GPU, about 8 minutes): the GPU test suites, bench_spmm.py
# for fp16 (and bf16 if time is left), the sanitizers, with the SM clock logged alongside (nvidia-smi, read only).
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_final_check.sh          (outputs under $OUT)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 1000 > "$OUT/clocks.csv" &
smi=$!
echo "=== tests"
timeout 150 python3 -m pytest -q tests/test_kernels_gpu.py tests/test_engine_gpu.py tests/test_checkpoint_gpu.py \
  tests/test_parallel_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
echo "=== bench_spmm fp16"
timeout 170 python3 benchmarks/bench_spmm.py --dtypes fp16 --out "$OUT/fp16" > "$OUT/spmm_fp16.log" 2>&1
tail -40 "$OUT/spmm_fp16.log"
echo "=== sanitizers"
CFGS="bitmap:3 tiled-csl:1 tiled-csl:3" timeout 150 bash benchmarks/gpu_sanitize.sh > /dev/null 2>&1; cat "$OUT/sanitize.log"
echo "=== bench_spmm bf16"
timeout 90 python3 benchmarks/bench_spmm.py --dtypes bf16 --ns 1,8,16,32,64 --out "$OUT/bf16" > "$OUT/spmm_bf16.log" 2>&1
tail -30 "$OUT/spmm_bf16.log"
kill $smi 2>/dev/null
awk -F', ' 'NR > 1 {print $2}' "$OUT/clocks.csv" | sort | uniq -c | sort -rn | head -5
