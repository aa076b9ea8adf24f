#!/usr/bin/env bash
# The device calls of session 78 (session 77's waiting items 0-1, benchmarks/ab/README.md), in steps, each log whole
# under $OUT/<step>.log (tee: a call stopped at its limit still returns what is under $OUT), its tail printed:
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_waiting_s78.sh spmm attn     (about 8 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT FUZZ_SECONDS=300 bash benchmarks/gpu_waiting_s78.sh e2e fuzz
# spmm: bench_spmm.py --quick --dtypes bf16 (per-N verdict lines, the faster of the dense times, rotated_bytes).
# attn: bench_decode_attention.py --rope (caches rotated beyond 3x L2, its results JSON).
# e2e:  a batch-1 bench_e2e.py, Llama-3-8B dense and 80 % DeltaRows (the floor line from the mean step, NOT RUN lines).
# fuzz: benchmarks/fuzz_spmm.py for FUZZ_SECONDS (FUZZ_ARGS: more options, e.g. --formats DeltaRows --seed 7).
# fixes: the fixes of the two failures the small-case fuzz found (tests/test_fuzz_fixes78.py): the GPU tests of the
#        fused norms, the two cases replayed, and a short fuzz of the norm ops alone (about 4 minutes).
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    spmm)
      step spmm 420 python3 benchmarks/bench_spmm.py --quick --dtypes bf16 --out "$OUT/spmm" ;;
    attn)
      step attn 150 python3 benchmarks/bench_decode_attention.py --rope --dtype bf16 --batches 1,16 --slots 256 \
        --out "$OUT/attn.json" ;;
    e2e)
      step e2e 300 python3 benchmarks/bench_e2e.py --models llama-3-8b --sparsities 0,80 --batches 1 \
        --format delta-rows --dtype bf16 --fuse --merge --no-hf --no-progress --out "$OUT/e2e" ;;
    fuzz)
      # shellcheck disable=SC2086
      step fuzz $(( ${FUZZ_SECONDS:-240} + 120 )) python3 benchmarks/fuzz_spmm.py --seconds "${FUZZ_SECONDS:-240}" \
        --device cuda --out "$OUT/fuzz" ${FUZZ_ARGS:-} ;;
    fixes)
      step fixes_tests 150 python3 -m pytest -q -rf -n 6 --timeout 120 -p no:cacheprovider tests/test_fuzz_fixes78.py \
        tests/test_kernels_gpu.py tests/test_delta_rows_gpu.py tests/test_engine_gpu.py \
        -k "fuzz or norm or parts or n1_even or one_launch or one_token_layers"
      for seed in 83594243893919 170972838936607; do
        step replay 30 python3 benchmarks/fuzz_spmm.py --replay $seed --max-elems 1048576 --device cuda
      done
      step fuzz_norms 50 python3 benchmarks/fuzz_spmm.py --seconds 30 --ops rms_norm,layer_norm --max-elems 1048576 \
        --seed 78003 --device cuda --out "$OUT/fuzz_norms" ;;
    *) echo "unknown step $s" ;;
  esac
done
