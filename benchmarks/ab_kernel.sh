#!/usr/bin/env bash
# Same-run comparison of kernel variants against the checked-out flash_llm/kernels/spmm.cu ("base"), one GPU.
#   bash benchmarks/ab_kernel.sh VARIANT [VARIANT ...]
# A VARIANT is a whole spmm.cu, or a patch of it (`git apply` applies it to a copy of the base; it works
# outside a git repository).  The prototypes waiting for a GPU are in benchmarks/ab/*.patch:
#   bash benchmarks/ab_kernel.sh benchmarks/ab/*.patch
# For each variant: the GPU kernel tests (tests/test_kernels_gpu.py, stop at the first failure).  Then, for each
# format in $FMTS (default "bitmap tiled-csl") and sparsity in $SPARSITIES (default "0.8 0.9"),
# benchmarks/time_across_n.py on the base and on every variant, the whole round twice, so that each version is
# timed twice, interleaved with the others.  Each version compiles into its own cache (FLASH_LLM_CACHE).
# The checked-out spmm.cu is restored at the end.  With 3 variants and the defaults it takes about 9 minutes
# (a device call allows 10); SPARSITIES=0.8 halves the timing part.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[ $# -ge 1 ] || { echo "usage: bash benchmarks/ab_kernel.sh VARIANT.cu|VARIANT.patch [...]" >&2; exit 2; }
K=flash_llm/kernels/spmm.cu
AB=/tmp/ab_kernel; rm -rf "$AB"; mkdir -p "$AB"
cp "$K" "$AB/base.cu"
trap 'cp "$AB/base.cu" "$K"' EXIT
versions=("$AB/base.cu")
for v in "$@"; do
  name=$(basename "$v"); name=${name%.*}
  case $v in
    *.patch)
      work=$(mktemp -d); mkdir -p "$work/flash_llm/kernels"; cp "$AB/base.cu" "$work/$K"
      (cd "$work" && git apply "$OLDPWD/$v") || { echo "$v does not apply to the checked-out spmm.cu" >&2; exit 2; }
      cp "$work/$K" "$AB/$name.cu" ;;
    *) cp "$v" "$AB/$name.cu" ;;
  esac
  versions+=("$AB/$name.cu")
done
for v in "${versions[@]:1}"; do
  cp "$v" "$K"
  echo "=== tests: $(basename "$v" .cu)"
  FLASH_LLM_CACHE=/tmp/flc_$(basename "$v" .cu) timeout 300 python3 -m pytest -q -x tests/test_kernels_gpu.py 2>&1 | tail -2
done
for fmt in ${FMTS:-bitmap tiled-csl}; do
  for sp in ${SPARSITIES:-0.8 0.9}; do
    for round in 1 2; do
      for v in "${versions[@]}"; do
        cp "$v" "$K"
        label=$(basename "$v" .cu)
        FLASH_LLM_CACHE=/tmp/flc_$label timeout 120 python3 benchmarks/time_across_n.py --fmt $fmt --sparsity $sp \
          --ns 1,16,32,64 | grep "^|" | grep -v "N |\|---" | sed "s/^/$label $fmt $sp r$round /"
      done
    done
  done
done
