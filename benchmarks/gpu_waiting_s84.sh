#!/usr/bin/env bash
# The device calls session 84 left, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s84.sh tests drift_all     (about 7 minutes, any card)
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s84.sh tests2              (about 4 minutes, any card)
# tests: session 84's changes on a real GPU: SparseLinear's to_empty() probe under CUDA moves
#        (tests/test_nn_fixes84.py), the fx-wrapped SparseLinear.forward inside the engine's CUDA graphs
#        (tests/test_engine_gpu.py -k graph), the engine's cleanup after a refused KV cache (tests/test_engine_fixes84.py)
#        and the GPU tests of SparseLinear / checkpoints (tests/test_checkpoint_gpu.py).
# drift_all: session 80's step (gpu_waiting_s80.sh drift_all).  Then fallback (an H200) as gpu_waiting_s80.sh says.
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    tests) step tests84 300 python3 -m pytest -q -rf -n 4 --timeout 250 -p no:cacheprovider \
             tests/test_nn_fixes84.py tests/test_engine_fixes84.py tests/test_checkpoint_gpu.py tests/test_engine_gpu.py \
             -k "not test_engine_gpu or graph" ;;
    # the transformers integration under the image's own transformers (another version than CI's), the hook fix, the
    # vmap rules with the CUDA kernels, and session 84's kernel-planning changes
    tests2) step tests84b 300 python3 -m pytest -q -rf -n 8 --timeout 250 -p no:cacheprovider \
             tests/test_checkpoint_gpu.py tests/test_hfq_fixes84.py tests/test_hfq_fixes83.py tests/test_hf_edge.py \
             tests/test_checkpoint.py tests/test_swap_save.py tests/test_load_edge.py tests/test_checkpoint_fixes84.py \
             tests/test_ops_fixes84.py tests/test_kernels_fixes84.py tests/test_delta_rows_gpu.py ;;
    drift_all|fallback) OUT=$OUT bash benchmarks/gpu_waiting_s80.sh "$s" ;;
    *) echo "unknown step $s" ;;
  esac
done
