#!/usr/bin/env bash
# The device calls session 81 left, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s81.sh bias tests     (about 5 minutes, any card)
# bias:   the expansion path's bias as the GEMM's C matrix (session 81's fix of the fuzzer's 6-ulp failure, seed
#         236704780892096): benchmarks/diag/bias_gemm.py (accuracy of F.linear's bias epilogue against the C matrix
#         where every output cancels, and their times on prefill shapes), then the GPU cases of tests/test_fixes81.py.
# tests:  the kernel cache and loading changes of session 81 on a real GPU (the CUDA tests of the build, engine-graph
#         and fixes files), a smoke check that the kernels still load and run.
# Then session 80's remaining steps: gpu_waiting_s80.sh drift_all, fuzz (FUZZ_ARGS="--seed 81001"), fallback (H200).
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    bias) step bias 150 python3 benchmarks/diag/bias_gemm.py
          step bias_tests 200 python3 -m pytest -q -rf -n 4 -p no:cacheprovider tests/test_fixes81.py -k cuda ;;
    tests) step tests81 300 python3 -m pytest -q -rf -n 4 --timeout 200 -p no:cacheprovider tests/test_fixes81.py \
             tests/test_build_fixes81.py tests/test_engine_gpu.py tests/test_engine_fixes82.py -k "cuda or graph or seeded" ;;
    drift_all|fuzz|fallback) OUT=$OUT bash benchmarks/gpu_waiting_s80.sh "$s" ;;
    *) echo "unknown step $s" ;;
  esac
done
