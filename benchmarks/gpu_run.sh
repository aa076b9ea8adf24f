#!/usr/bin/env bash
# One device-machine session: versions, GPU test-suite, encoder speed, kernel benchmark.
# Usage: bash benchmarks/gpu_run.sh [tests] [formats] [spmm-quick] [spmm-full] [sanitize]
# Logs and results go to $OUT (or benchmarks/out).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, cuda.bindings, safetensors; print('torch', torch.__version__, 'cuda-bindings', cuda.bindings.__version__)"
python3 -c "from flash_llm.kernels._build import compile_kernels as c; r=c('sm_90'); print('compiled', len(r.cubin), r.warnings())"
for stage in "$@"; do
  echo "=== $stage"
  case $stage in
    tests) timeout 420 python3 -m pytest -q -x tests/test_kernels_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    formats) python3 benchmarks/bench_formats.py --device cuda 2>&1 | tee "$OUT/bench_formats.log" ;;
    spmm-quick) python3 benchmarks/bench_spmm.py --quick --dtypes fp16 --sparsities 50,80,90 --ns 1,16,64,256,2048 --out "$OUT/spmm" > "$OUT/spmm_quick.log" 2>&1; tail -40 "$OUT/spmm_quick.log" ;;
    spmm-mini) python3 benchmarks/bench_spmm.py --quick --dtypes fp16 --sparsities 50,80,90 --ns 1,16,32,64 --out "$OUT/spmm" > "$OUT/spmm_mini.log" 2>&1; tail -12 "$OUT/spmm_mini.log" ;;
    spmm-full) python3 benchmarks/bench_spmm.py --out "$OUT/spmm" > "$OUT/spmm_full.log" 2>&1; tail -30 "$OUT/spmm_full.log" ;;
    sanitize)
      # memcheck over the kernel tests; racecheck over a reduced set, with hazards grouped by kernel
      # (torch's own reference F.linear runs cuBLAS kernels, which racecheck reports too).
      sel="adversarial or split_k or decode"
      timeout 300 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 \
        python3 -m pytest -q -x tests/test_kernels_gpu.py -k "$sel" 2>&1 | tail -3 | tee -a "$OUT/sanitize.log"
      timeout 300 compute-sanitizer --tool racecheck --report-api-errors no --print-limit 100 \
        python3 -m pytest -q -x tests/test_kernels_gpu.py -k "$sel" > "$OUT/racecheck.log" 2>&1
      grep -E "RACECHECK SUMMARY|passed|failed" "$OUT/racecheck.log" | tee -a "$OUT/sanitize.log"
      echo "hazards by kernel:" | tee -a "$OUT/sanitize.log"
      grep -oE "(Read|Write) access at [A-Za-z0-9_]+" "$OUT/racecheck.log" | awk '{print $4}' | sort | uniq -c | tee -a "$OUT/sanitize.log" ;;
  esac
done
