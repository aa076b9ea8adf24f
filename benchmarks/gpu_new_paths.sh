#!/usr/bin/env bash
# One device call (one GPU) for the paths written without a GPU on 2026-11-29, all off by default:
#   tests   the GPU tests that cover them (kernels incl. chunked expansion, engine incl. fuse=True and
#           merge=True, parallel at world size 1)
#   fuse    bench_e2e --quick (Llama-3-8B shape, dense and 80 %) plain, with --merge, and with --fuse --merge
#   chunk   time_across_n.py at N = 128, 256, 512 with the whole-weight expansion and with 32 MB chunks (bitmap)
# e.g.  FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_new_paths.sh tests fuse chunk     (outputs under $OUT)
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
    chunk)
      for fmt in bitmap; do
        timeout 120 python3 benchmarks/time_across_n.py --fmt $fmt --ns 128,256,512 | sed "s/^/whole /"
        FLASH_LLM_EXPAND_CHUNK_BYTES=33554432 timeout 120 python3 benchmarks/time_across_n.py --fmt $fmt \
          --ns 128,256,512 | sed "s/^/chunked /"
      done ;;
    *) echo "unknown stage $stage (tests fuse chunk)" >&2; exit 2 ;;
  esac
done
