#!/usr/bin/env bash
# The device calls of session 77, in steps, each log whole under $OUT/<step>.log (tee: a call stopped at its limit
# still returns what is under $OUT), its tail printed:
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s77.sh tests trace   (about 5 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT FUZZ_SECONDS=240 bash benchmarks/gpu_waiting_s77.sh fuzz
# tests: session 76's waiting item 0: the decode attention's push and pull combines after their chunk weighting was
#        folded into one device function (da_weigh), and the engine test's `_p` kernel-name check.
# trace: session 76's waiting item 1: the attention's phases inside the batch-1 step with the push combine
#        (benchmarks/gpu_waiting_s75.sh trace: attn_trace.py --step on a copy of the tree with the trace patch).
# fuzz:  benchmarks/fuzz_spmm.py for FUZZ_SECONDS on the GPU: random formats, shapes, densities, token counts, x
#        layouts, fused ops and run-time switches against the float64 reference, failures with reproducers in
#        $OUT/fuzz/failures.jsonl.
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    tests)
      step tests 280 python3 -m pytest -q -rf -n 4 --timeout 200 -p no:cacheprovider tests/test_decode_attention.py \
        tests/test_engine_gpu.py -k "cluster or small_chunks or float64" ;;
    trace)
      OUT=$OUT bash benchmarks/gpu_waiting_s75.sh trace ;;
    fuzz)
      step fuzz $(( ${FUZZ_SECONDS:-240} + 120 )) python3 benchmarks/fuzz_spmm.py --seconds "${FUZZ_SECONDS:-240}" \
        --device cuda --out "$OUT/fuzz" ;;
    *) echo "unknown step $s" ;;
  esac
done
