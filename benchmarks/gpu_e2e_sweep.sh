#!/usr/bin/env bash
# The full end-to-end sweep of issue 4 for one model per device call (one GPU):
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_e2e_sweep.sh MODEL [bench_e2e options...]
# e.g.  bash benchmarks/gpu_e2e_sweep.sh llama-3-8b --merge          (dense + 50/70/80/90 %, batches 1-64, HF baseline)
#       bash benchmarks/gpu_e2e_sweep.sh opt-30b --merge --no-hf --repeats 2
# Prompt 128, 128 new tokens (bench_e2e's defaults).  Results under $OUT/e2e_MODEL (json, csv, png, summary.md).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
model=$1; shift
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
s0=$(date +%s)
timeout ${SWEEP_TIMEOUT_S:-560} python3 benchmarks/bench_e2e.py --models "$model" --no-progress "$@" \
  --out "$OUT/e2e_$model" > "$OUT/e2e_$model.log" 2>&1
echo "rc $? after $(( $(date +%s) - s0 )) s"
tail -60 "$OUT/e2e_$model.log"
