#!/usr/bin/env bash
# The device calls session 83 left, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s83.sh tests fuzz        (about 6 minutes, any card)
# tests: session 83's changes on a real GPU: the CUDA case of tests/test_engine_fixes83.py (an Engine and a stream
#        made under torch.inference_mode() with CUDA graphs), the NVRTC buffers (tests/test_fixes83.py), the
#        expansion path's bias (tests/test_fixes81.py -k cuda: F.linear again) and a smoke run of the kernel tests.
# fuzz:  benchmarks/fuzz_spmm.py (FUZZ_SECONDS, default 150; FUZZ_ARGS, default --seed 83003), as session 79's step.
# Then session 80's remaining steps: gpu_waiting_s80.sh drift_all, fallback (H200).
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    tests) step tests83 300 python3 -m pytest -q -rf -n 4 --timeout 250 -p no:cacheprovider \
             tests/test_engine_fixes83.py tests/test_fixes83.py tests/test_fixes81.py tests/test_kernels_gpu.py \
             -k "cuda or nvrtc or n1 or bias" ;;
    fuzz) FUZZ_ARGS=${FUZZ_ARGS:---seed 83003} OUT=$OUT bash benchmarks/gpu_waiting_s80.sh fuzz ;;
    drift_all|fallback) OUT=$OUT bash benchmarks/gpu_waiting_s80.sh "$s" ;;
    *) echo "unknown step $s" ;;
  esac
done
