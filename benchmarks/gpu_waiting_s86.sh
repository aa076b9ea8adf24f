#!/usr/bin/env bash
# Session 86's device calls, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   OUT=$OUT bash benchmarks/gpu_waiting_s86.sh verify                   (about 4 minutes, any card)
# verify: session 86's fixes on a GPU: SparseLinear under CUDA autocast (tests/test_nn_fixes86.py), layers whose class
#         overrides forward inside the engine (tests/test_engine_subclass86.py) beside the engine's CUDA-graph tests,
#         and the two tests that failed only under the image's versions (tests/test_*_fixes79.py).
# suite_a / suite_e / suite_n: the whole test suite on the GPU machine in three pieces (test files a-d, e-m, n-z),
#         `-v` so that failures are named as they happen (session 86: the whole suite in one go passed a call's limit
#         at a quarter, its failures unnamed); each piece up to 9 minutes, one call each.
# Other steps: gpu_waiting_s80.sh fallback (an H200) still waits.
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    verify) step verify86 280 python3 -m pytest -q -rfE -n 8 --timeout 200 -p no:cacheprovider -W ignore \
              tests/test_nn_fixes86.py tests/test_engine_subclass86.py tests/test_env_fixes86.py \
              tests/test_build_fixes79.py tests/test_checkpoint_fixes79.py tests/test_engine_hooks85.py \
              tests/test_engine_gpu.py -k "not test_engine_gpu or graph" ;;
    suite_a|suite_e|suite_n)
      case $s in suite_a) files=$(ls tests/test_[a-d]*.py) ;; suite_e) files=$(ls tests/test_[e-m]*.py) ;;
                 *) files=$(ls tests/test_[n-z]*.py) ;; esac
      step "$s" 540 python3 -m pytest -v -rfE -n 16 --timeout 300 -p no:cacheprovider -W ignore $files \
        | grep -E "FAILED|ERROR|passed|failed" ;;
    fallback) OUT=$OUT bash benchmarks/gpu_waiting_s80.sh fallback ;;
    *) echo "unknown step $s" ;;
  esac
done
