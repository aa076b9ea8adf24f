#!/usr/bin/env bash
# Same-run A/B of two versions of flash_llm/kernels/spmm.cu (device machine, one GPU): the GPU kernel tests on
# version B, then time_across_n.py on A and on B, alternating twice, for each format in $FMTS (default
# "bitmap tiled-csl") at $SPARSITIES (default "0.8 0.9").
#   bash benchmarks/ab_kernel.sh [A.cu] [B.cu]     (B defaults to the checked-out spmm.cu)
# A defaults to benchmarks/ab/spmm_A.cu: on a branch, write it first with
#   mkdir -p benchmarks/ab && git show main:flash_llm/kernels/spmm.cu > benchmarks/ab/spmm_A.cu
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
K=flash_llm/kernels/spmm.cu
A=${1:-benchmarks/ab/spmm_A.cu}; B=${2:-/tmp/spmm_B.cu}
[ -n "${2:-}" ] || cp "$K" "$B"
run() { cp "$1" "$K"; FLASH_LLM_CACHE=/tmp/flc_$2 timeout 120 python3 benchmarks/time_across_n.py --fmt $3 \
          --sparsity $4 --ns 1,16,32,64 | sed "s/^/$2 /"; }
cp "$B" "$K"
FLASH_LLM_CACHE=/tmp/flc_B timeout 300 python3 -m pytest -q -x tests/test_kernels_gpu.py 2>&1 | tail -3
for fmt in ${FMTS:-bitmap tiled-csl}; do
  for sp in ${SPARSITIES:-0.8 0.9}; do
    for round in 1 2; do run "$A" A $fmt $sp; run "$B" B $fmt $sp; done
  done
done
cp "$B" "$K"
