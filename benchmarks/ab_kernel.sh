#!/usr/bin/env bash
# Same-run comparison of versions of flash_llm/kernels/spmm.cu on one GPU (device machine).
#   bash benchmarks/ab_kernel.sh BASE.cu VARIANT.cu [VARIANT.cu ...]
# For each variant: the GPU kernel tests (tests/test_kernels_gpu.py, stop at the first failure).  Then, for each
# format in $FMTS (default "bitmap tiled-csl") and sparsity in $SPARSITIES (default "0.8 0.9"),
# benchmarks/time_across_n.py on BASE and on every variant, the whole round twice, so that each version is
# timed twice, interleaved with the others.  Each version compiles into its own cache (FLASH_LLM_CACHE).
# Branch kernel-experiments keeps main's kernel and the prototypes in benchmarks/ab/:
#   bash benchmarks/ab_kernel.sh benchmarks/ab/spmm_A.cu benchmarks/ab/spmm_[!A]*.cu
# The checked-out spmm.cu is restored at the end.  With 3 variants and the defaults it takes about 9 minutes
# (a device call allows 10); SPARSITIES=0.8 halves the timing part.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[ $# -ge 2 ] || { echo "usage: bash benchmarks/ab_kernel.sh BASE.cu VARIANT.cu [VARIANT.cu ...]" >&2; exit 2; }
K=flash_llm/kernels/spmm.cu
cp "$K" /tmp/spmm_checked_out.cu
trap 'cp /tmp/spmm_checked_out.cu "$K"' EXIT
label() { basename "$1" .cu; }
for v in "${@:2}"; do
  cp "$v" "$K"
  echo "=== tests: $(label "$v")"
  FLASH_LLM_CACHE=/tmp/flc_$(label "$v") timeout 300 python3 -m pytest -q -x tests/test_kernels_gpu.py 2>&1 | tail -2
done
for fmt in ${FMTS:-bitmap tiled-csl}; do
  for sp in ${SPARSITIES:-0.8 0.9}; do
    for round in 1 2; do
      for v in "$@"; do
        cp "$v" "$K"
        FLASH_LLM_CACHE=/tmp/flc_$(label "$v") timeout 120 python3 benchmarks/time_across_n.py --fmt $fmt \
          --sparsity $sp --ns 1,16,32,64 | grep "^|" | grep -v "N |\|---" | sed "s/^/$(label "$v") $fmt $sp r$round /"
      done
    done
  done
done
