#!/usr/bin/env bash
# The device calls of session 79, in steps, each log whole under $OUT/<step>.log (benchmarks/gpu_lib.sh):
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s79.sh norms fuzz        (about 6 minutes, an H100)
# norms: fp16 RMSNorm weights above 1 inside the kernels (scaled copies, kernels.rms_kernel_weight): the new GPU tests,
#        session 78's (its engine test rewritten), the fused-norm tests of the kernel / engine files, and a fuzz of
#        the norm ops alone with small cases.
# fuzz:  benchmarks/fuzz_spmm.py, small cases (FUZZ_SECONDS, default 150; FUZZ_ARGS adds options, e.g. --seed).
# drift: benchmarks/diag/dense_drift.py: bench_spmm.py's dense N = 1 baseline before / after sparse bursts, an idle
#        pause, the allocator emptied, with nvidia-smi's clocks (session 78's waiting item 3): the small-N Tiled-CSL
#        burst (session 79: no drift), then bursts as the benchmark's (BitmapTiles, the expansion; about 3 minutes).
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    norms)
      step norms_tests 240 python3 -m pytest -q -rf -n 6 --timeout 150 -p no:cacheprovider tests/test_norm_scale79.py \
        tests/test_fuzz_fixes78.py tests/test_kernels_gpu.py tests/test_delta_rows_gpu.py tests/test_engine_gpu.py \
        -k "scale79 or fuzz or norm or parts or n1_even or one_launch or one_token_layers"
      step fuzz_norms 80 python3 benchmarks/fuzz_spmm.py --seconds 60 --ops rms_norm,layer_norm --max-elems 1048576 \
        --seed 79001 --device cuda --out "$OUT/fuzz_norms" ;;
    fuzz)
      # shellcheck disable=SC2086
      step fuzz $(( ${FUZZ_SECONDS:-150} + 90 )) python3 benchmarks/fuzz_spmm.py --seconds "${FUZZ_SECONDS:-150}" \
        --max-elems 1048576 --device cuda --out "$OUT/fuzz" ${FUZZ_ARGS:-} ;;
    drift)
      step drift 150 python3 benchmarks/diag/dense_drift.py
      step drift_all 200 python3 benchmarks/diag/dense_drift.py --burst-formats tiled-csl,bitmap \
        --burst-ns 1,8,16,32,256,2048 --burst-s 40 --pause-s 5 --repeats 3 ;;
    *) echo "unknown step $s" ;;
  esac
done
