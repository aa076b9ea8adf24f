#!/usr/bin/env bash
# Session 87's device calls, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   OUT=$OUT bash benchmarks/gpu_waiting_s87.sh verify                   (about 5 minutes, any card)
# verify: sessions 86's and 87's fixes on a GPU: session 86's (gpu_waiting_s86.sh verify: CUDA autocast, subclassed
#         layers in the engine's CUDA graphs, the image's versions) with session 87's: the decode attention's grid limit
#         (tests/test_kernels_fixes87.py, 1 GiB of cache), the BitmapTiles / Tiled-CSL length bounds against every
#         GPU encoding and kernel (tests/test_formats_fixes87.py beside tests/test_kernels_gpu.py and
#         test_formats_gpu.py, where a bound too tight would refuse a real weight), and the engine's dual layout after a
#         new bias or a hook.
# quick: verify's kernel, format, autocast and subclass tests alone (about 3 minutes: a short device budget).
# suite_a / suite_e / suite_n: gpu_waiting_s86.sh's (the whole suite in three pieces); fallback: gpu_waiting_s80.sh's.
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    verify) step verify87 330 python3 -m pytest -q -rfE -n 8 --timeout 250 -p no:cacheprovider -W ignore \
              tests/test_nn_fixes86.py tests/test_engine_subclass86.py tests/test_env_fixes86.py \
              tests/test_build_fixes79.py tests/test_checkpoint_fixes79.py tests/test_engine_hooks85.py \
              tests/test_kernels_fixes87.py tests/test_formats_fixes87.py tests/test_engine_fixes87.py \
              tests/test_misc_fixes87.py tests/test_kernels_gpu.py tests/test_formats_gpu.py \
              tests/test_engine_gpu.py -k "not test_engine_gpu or graph" ;;
    quick) step quick87 200 python3 -m pytest -q -rfE -n 8 --timeout 150 -p no:cacheprovider -W ignore \
              tests/test_kernels_fixes87.py tests/test_formats_fixes87.py tests/test_kernels_gpu.py \
              tests/test_formats_gpu.py tests/test_nn_fixes86.py tests/test_engine_subclass86.py ;;
    suite_a|suite_e|suite_n|fallback) OUT=$OUT bash benchmarks/gpu_waiting_s86.sh "$s" ;;
    *) echo "unknown step $s" ;;
  esac
done
