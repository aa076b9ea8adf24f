#!/usr/bin/env bash
# Session 76: the decode attention's push combine (kernels.DECODE_ATTN_PUSH, `decode_attn_*_p`) against the pull
# combine, in steps, each log whole under $OUT/<step>.log (tee), its tail printed:
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_push_s76.sh tests alone   (about 4 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_push_s76.sh e2e           (about 6 minutes)
# tests:  tests/test_decode_attention.py (push and pull give the global combine's bits; the `_c32_p` kernels), then
#         compute-sanitizer memcheck and racecheck over bench_decode_attention.py --check-only (decode_attn kernels).
# alone:  bench_decode_attention.py (bf16, RoPE, 128-512 slots, batch 1 and 2), push / pull / push / pull.
# e2e:    bench_e2e.py Llama-3-8B bf16 DeltaRows 80 %, batch $E2E_BATCHES (default 1), fused and merged, push / pull,
#         two rounds.
set -uo pipefail
source benchmarks/gpu_lib.sh  # OUT, PYTHONPATH, step NAME SECONDS COMMAND...
for s in "$@"; do
  case $s in
    tests)
      step tests 240 python3 -m pytest -q -rf -n 4 --timeout 200 -p no:cacheprovider tests/test_decode_attention.py
      for tool in memcheck racecheck; do
        step tests 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 1 --kernel-name kns=decode_attn \
          python3 benchmarks/bench_decode_attention.py --check-only --rope --dtype bf16 --batches 1,2 --slots 100,256,512 \
          --layers 2
        echo "$tool rc=$?" | tee -a "$OUT/tests.log"
      done ;;
    alone)
      for r in 1 2; do
        for p in 1 0; do
          echo "--- round $r, FLASH_LLM_DECODE_ATTN_PUSH=$p" | tee -a "$OUT/alone.log"
          FLASH_LLM_DECODE_ATTN_PUSH=$p step alone 100 python3 benchmarks/bench_decode_attention.py --rope --dtype bf16 \
            --batches 1,2 --slots 128,256,512
        done
      done ;;
    e2e)
      for r in 1 2; do
        for p in 1 0; do
          echo "--- round $r, FLASH_LLM_DECODE_ATTN_PUSH=$p" | tee -a "$OUT/e2e.log"
          FLASH_LLM_DECODE_ATTN_PUSH=$p step e2e 140 python3 benchmarks/bench_e2e.py --models llama-3-8b --no-progress \
            --fuse --merge --no-hf --repeats 3 --format delta-rows --dtype bf16 --batches "${E2E_BATCHES:-1}" --sparsities 80 \
            --out "/tmp/e2e_push${p}_$r" --overwrite
        done
      done ;;
    *) echo "unknown step $s" ;;
  esac
done
