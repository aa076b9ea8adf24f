#!/usr/bin/env bash
# One device-machine run for the pruning work: train the bundled model, measure pruning accuracy on it, time
# SparseGPT on a 4096x4096 layer, run the demo and the GPU tests of the pruning files.
# Usage (repository root):  FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_prune.sh train accuracy bench demo tests
# Stages run in the order given. Everything printed also goes to $OUT/gpu_prune.log; the trained model
# (config.json, model.safetensors), ACCURACY.md and accuracy.json are copied to $OUT (or benchmarks/out).
# Expected time on one H100/H200: train ~2 min, accuracy ~2-3 min, bench < 1 min, demo < 1 min, tests ~1 min.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc TQDM_DISABLE=1
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
LOG="$OUT/gpu_prune.log"
MODEL=flash_llm/bundled/tiny-shakespeare
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${FLASH_LLM_COMMIT:-unknown}"
} 2>&1 | tee "$LOG"
for stage in "$@"; do
  echo "=== $stage ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  case $stage in
    train)
      timeout 300 python3 scripts/train_bundled.py --out "$MODEL" --force --no-progress 2>&1 | tee -a "$LOG"
      cp "$MODEL/config.json" "$MODEL/model.safetensors" "$OUT/" ;;
    accuracy)
      timeout 420 python3 benchmarks/accuracy.py --force --quiet --json "$OUT/accuracy.json" 2>&1 | tee -a "$LOG"
      cp benchmarks/ACCURACY.md "$OUT/" ;;
    bench)
      timeout 180 python3 benchmarks/bench_prune.py 2>&1 | tee -a "$LOG" ;;
    demo)
      timeout 180 python3 -m flash_llm.cli demo 2>&1 | tee -a "$LOG" ;;
    tests)
      # all tests of the pruning files (the GPU ones included), now against the freshly trained model
      timeout 300 python3 -m pytest -q tests/test_demo.py tests/test_accuracy_bench.py tests/test_bundled.py \
        tests/test_data.py tests/test_evaluate.py 2>&1 | tail -15 | tee -a "$LOG" ;;
    *) echo "unknown stage $stage (train, accuracy, bench, demo, tests)" | tee -a "$LOG" ;;
  esac
done
