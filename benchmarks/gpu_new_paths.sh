#!/usr/bin/env bash
# One device call (one GPU) for the engine's optional paths (first run 2026-11-29, session 4):
#   tests   the GPU tests that cover them (kernels, engine incl. fuse=True and merge=True, parallel at world
#           size 1)
#   fuse    bench_e2e --quick (Llama-3-8B shape, dense and 80 %) plain, with --merge, and with --fuse --merge
# e.g.  FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_new_paths.sh tests fuse     (outputs under $OUT)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for stage in "$@"; do
  echo "=== $stage"
  case $stage in
    tests) timeout 240 python3 -m pytest -q -x tests/test_kernels_gpu.py tests/test_engine_gpu.py \
             tests/test_parallel_gpu.py 2>&1 | tee "$OUT/new_paths_tests.log" | tail -4 ;;
    fuse)
      for v in plain merge fuse_merge; do
        flags=$(echo "$v" | sed 's/plain//; s/fuse_merge/--fuse --merge/; s/^merge$/--merge/')
        s0=$(date +%s)
        timeout 150 python3 benchmarks/bench_e2e.py --quick --sparsities 0,80 --no-hf --no-progress $flags \
          --out "$OUT/e2e_$v" > "$OUT/e2e_$v.log" 2>&1
        echo "--- $v ($flags): $(( $(date +%s) - s0 )) s"; grep -A6 "decode tokens/s" "$OUT/e2e_$v.log" | head -8
      done ;;
    *) echo "unknown stage $stage (tests fuse)" >&2; exit 2 ;;
  esac
done
