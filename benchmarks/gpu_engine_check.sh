#!/usr/bin/env bash
# One device call for the model/engine work: GPU tests of the engine and of SparseLinear, then a quick
# end-to-end benchmark (Llama-3-8B shape: dense, 70 %, 80 %; batch 1, 16, 64), without and with --fuse.
# Output under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 240 python3 -m pytest -q -x -m gpu tests/test_engine_gpu.py tests/test_nn.py 2>&1 | tee "$OUT/engine_tests.log" | tail -6
timeout 300 python3 benchmarks/bench_e2e.py --quick --out "$OUT/e2e" "$@" > "$OUT/e2e.log" 2>&1
tail -30 "$OUT/e2e.log"
# the same with the fused elementwise kernels (Engine(fuse=True)), for a same-call comparison
timeout 300 python3 benchmarks/bench_e2e.py --quick --fuse --no-hf --out "$OUT/e2e_fused" "$@" > "$OUT/e2e_fused.log" 2>&1
tail -16 "$OUT/e2e_fused.log"
