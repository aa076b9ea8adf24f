#!/usr/bin/env bash
# Session 85's device calls, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s85.sh hfq       (about 1.5 minutes, any card)
# hfq: the transformers integration under the image's transformers (5.17, whose update_weight_conversions takes the
#      conversions only): session 83's key_mapping tests, session 84's and 85's emulations, the checkpoint GPU tests.
# Other steps: gpu_waiting_s79.sh fuzz (FUZZ_SECONDS / FUZZ_ARGS), gpu_waiting_s80.sh fallback (an H200).
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    hfq) step hfq85 240 python3 -m pytest -q -rf -n 8 --timeout 200 -p no:cacheprovider tests/test_hfq_fixes83.py \
           tests/test_hfq_fixes84.py tests/test_hfq_fixes85.py tests/test_checkpoint_gpu.py tests/test_hf_edge.py ;;
    fuzz) OUT=$OUT bash benchmarks/gpu_waiting_s79.sh fuzz ;;
    fallback) OUT=$OUT bash benchmarks/gpu_waiting_s80.sh fallback ;;
    *) echo "unknown step $s" ;;
  esac
done
