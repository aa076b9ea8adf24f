#!/usr/bin/env bash
# The device calls of session 80, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s80.sh tests drift fuzz      (about 8 minutes, any card)
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s80.sh fallback              (about 6 minutes, an H200)
# tests:    session 80's GPU tests (tests/test_fixes80.py: spmm_add_ with a bias inside acc, every format and path) and
#           the engine's CUDA-graph tests (the capture's warm-ups now run from a clamped slot / position).
# drift, fuzz: session 79's steps (benchmarks/gpu_waiting_s79.sh; FUZZ_SECONDS, FUZZ_ARGS as there); drift_all: the
#           drift's second half alone (BitmapTiles and the expansion bursts).
# fallback: session 66's BitmapTiles where Tiled-CSL does not fit, OPT-175B at 80 % at batch 16 on an H200
#           (benchmarks/gpu_waiting_s64.sh fallback).
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    tests) step tests80 300 python3 -m pytest -q -rf -n 4 --timeout 200 -p no:cacheprovider tests/test_fixes80.py \
             tests/test_engine_fixes80.py tests/test_ops_fixes80.py tests/test_engine_gpu.py \
             -k "fixes80 or bias_inside or graph or seeded" ;;
    drift|fuzz) OUT=$OUT bash benchmarks/gpu_waiting_s79.sh "$s" ;;
    drift_all) step drift_all 200 python3 benchmarks/diag/dense_drift.py --burst-formats tiled-csl,bitmap \
                 --burst-ns 1,8,16,32,256,2048 --burst-s 40 --pause-s 5 --repeats 3 ;;
    fallback) OUT=$OUT bash benchmarks/gpu_waiting_s64.sh fallback ;;
    *) echo "unknown step $s" ;;
  esac
done
