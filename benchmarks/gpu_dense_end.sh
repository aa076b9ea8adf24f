#!/usr/bin/env bash
# Session 45: batched engines hold 50 %-sparse DeltaRows layers dense (Tiled-CSL would be no smaller), one device call:
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_dense_end.sh
# 1. the GPU tests of the engine's layouts (-k "delta_layout or dense or dual");
# 2. bench_e2e.py, Llama-3-8B, DeltaRows 0 / 50 %, batches $DE_BATCHES (default 8,32,64), the new rule (dense layers);
# 3. the same 50 % rows with FLASH_LLM_RELAYOUT_DENSE_SHARE=9 (the old rule: Tiled-CSL; against stage 2's dense).
# Logs in $OUT (tests.log, e2e_dense_end.log); bench_e2e's own files are left out (only a few files come back).
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
echo "=== tests"; timeout 150 python3 -m pytest -q --tb=short tests/test_engine_gpu.py -k "delta_layout or dense or dual" \
  > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"
run() {  # label, timeout, env settings, bench_e2e arguments
  echo "--- $1"; (for v in $3; do export "$v"; done
  timeout "$2" python3 benchmarks/bench_e2e.py --models llama-3-8b --no-progress --fuse --merge --no-hf --repeats 2 \
    --format delta-rows --batches "${DE_BATCHES:-8,32,64}" "${@:4}" --out "/tmp/e2e_$1" 2>&1 | grep "b=\|rror")
}
{ run new 270 "" --sparsities 0,50
  run old 170 "FLASH_LLM_RELAYOUT_DENSE_SHARE=9" --sparsities 50; } 2>&1 | tee "$OUT/e2e_dense_end.log"
