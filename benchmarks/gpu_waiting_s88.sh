#!/usr/bin/env bash
# Session 88's device calls, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   OUT=$OUT bash benchmarks/gpu_waiting_s88.sh verify                   (about 6 minutes, any card)
# verify: gpu_waiting_s87.sh's verify (sessions 86-87's fixes on a GPU: autocast, subclassed layers in the CUDA graphs,
#         the decode attention's grid limit, the formats' length bounds against every GPU encoding and kernel, the
#         dual layout) with session 88's: the engine's zeroed cache slots inside its CUDA graphs and the decode
#         attention kernel (tests/test_engine_fixes88.py beside the engine's GPU graph tests), the raw ops' coded
#         DeltaRows check and the float8 checkpoint (tests/test_lead_fixes88.py).
# quick: gpu_waiting_s87.sh's quick (its kernel / format / autocast / subclass tests alone, about 3 minutes).
# suite_a / suite_e / suite_n: gpu_waiting_s86.sh's (the whole suite in three pieces); fallback: gpu_waiting_s80.sh's.
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    verify) step verify88 380 python3 -m pytest -q -rfE -n 8 --timeout 250 -p no:cacheprovider -W ignore \
              tests/test_nn_fixes86.py tests/test_engine_subclass86.py tests/test_env_fixes86.py \
              tests/test_build_fixes79.py tests/test_checkpoint_fixes79.py tests/test_engine_hooks85.py \
              tests/test_kernels_fixes87.py tests/test_formats_fixes87.py tests/test_engine_fixes87.py \
              tests/test_misc_fixes87.py tests/test_kernels_gpu.py tests/test_formats_gpu.py \
              tests/test_engine_fixes88.py tests/test_lead_fixes88.py \
              tests/test_engine_gpu.py -k "not test_engine_gpu or graph" ;;
    quick|suite_a|suite_e|suite_n|fallback) OUT=$OUT bash benchmarks/gpu_waiting_s87.sh "$s" ;;
    *) echo "unknown step $s" ;;
  esac
done
