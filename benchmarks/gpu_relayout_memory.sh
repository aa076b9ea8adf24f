#!/usr/bin/env bash
# Session 46: relayout frees each old layer as it goes; delta_layout="dual" holds dense copies at 50 %. One call:
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_relayout_memory.sh
# 1. the GPU tests of the engine's layouts (-k "delta_layout or dense or dual");
# 2. bench_e2e.py at 50 % (DeltaRows, the engine's own layout): Llama-3-8B batch 8 and OPT-30B batch 8, dense beside
#    (peak GPU memory: session 45 measured 27.3 / 97.4 GiB against dense 23.5 / 69.6, every old weight held to the end);
# 3. Llama-3-8B 0 / 50 %, delta_layout="dual", max_batch 8, batches 1 and 8 (dense copies at 50 %).
# Logs in $OUT (tests.log, e2e.log); bench_e2e's own files are left out (only a few files come back).
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
echo "=== tests"; timeout 180 python3 -m pytest -q --tb=short tests/test_engine_gpu.py -k "delta_layout or dense or dual" \
  > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"
run() {  # label, timeout, model, bench_e2e arguments
  echo "--- $1"
  timeout "$2" python3 benchmarks/bench_e2e.py --models "$3" --no-progress --fuse --merge --no-hf --repeats 2 \
    --format delta-rows "${@:4}" --out "/tmp/e2e_$1" 2>&1 | tr '\r' '\n' | grep "b=\|rror"
}
{ run llama_auto 200 llama-3-8b --batches 8 --sparsities 0,50
  run llama_dual 240 llama-3-8b --batches 1,8 --max-batch 8 --delta-layout dual --sparsities 0,50
  run opt_auto 300 opt-30b --batches 8 --sparsities 0,50; } 2>&1 | tee "$OUT/e2e.log"
