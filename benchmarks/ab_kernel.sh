#!/usr/bin/env bash
# Same-run comparison of prototypes against the checked-out tree ("base"), one GPU.
#   bash benchmarks/ab_kernel.sh VARIANT [VARIANT ...]
# A VARIANT is a patch of the repository (`git diff` output: it may change the kernels, the formats and their
# tests together) or a whole spmm.cu.  The prototypes waiting for a GPU are in benchmarks/ab/*.patch:
#   bash benchmarks/ab_kernel.sh benchmarks/ab/*.patch
# Every version runs from its own copy of the working tree under /tmp/ab_kernel, with its
# own kernel cache; the checked-out files are never modified.  For each variant: $AB_TESTS (default the GPU kernel
# tests, stop at the first failure).  Then, for each format in $FMTS (default "bitmap tiled-csl") and sparsity in
# $SPARSITIES (default "0.8 0.9"), benchmarks/time_across_n.py on the base and on every variant, the whole round
# twice, so that each version is timed twice, interleaved with the others, at the N of $NS (default 1,16,32,64;
# N > 64 times the large-N path: expansion + cuBLAS, unless AB_FORCE=1 times the sparse kernel at every N); AB_M
# and AB_K change the shape (default 9216 x 36864).  With 3 variants and the defaults it
# takes about 8 minutes (a device call allows 10); SPARSITIES=0.8 or FMTS=bitmap halves the timing part.
set -uo pipefail
export PYTHONUNBUFFERED=1
[ $# -ge 1 ] || { echo "usage: bash benchmarks/ab_kernel.sh VARIANT.patch|VARIANT.cu [...]" >&2; exit 2; }
ROOT=$PWD
AB=/tmp/ab_kernel; rm -rf "$AB"; mkdir -p "$AB"
copy_tree() {  # the working tree without .git, virtual environments, caches and results
  mkdir -p "$1" && tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=__pycache__ --exclude=./benchmarks/results \
    --exclude=./benchmarks/out --exclude=*.egg-info -cf - . | tar -C "$1" -xf -; }
copy_tree "$AB/base"
names=(base)
for v in "$@"; do
  name=$(basename "$v"); name=${name%.*}
  copy_tree "$AB/$name"
  case $v in
    *.patch) (cd "$AB/$name" && git apply "$ROOT/$v") || { echo "$v does not apply to the checked-out tree" >&2; exit 2; } ;;
    *) cp "$v" "$AB/$name/flash_llm/kernels/spmm.cu" ;;
  esac
  names+=("$name")
done
run_in() {  # run_in NAME CMD...: in that version's tree, importing its flash_llm, with its own kernel cache
  local name=$1; shift
  (cd "$AB/$name" && PYTHONPATH="$AB/$name" FLASH_LLM_CACHE="/tmp/flc_$name" "$@")
}
for name in "${names[@]:1}"; do
  echo "=== tests: $name"
  run_in "$name" python3 -c "import flash_llm, sys; sys.exit(not flash_llm.__file__.startswith('$AB/$name'))" \
    || { echo "$name: its flash_llm is not the one imported" >&2; exit 2; }
  # shellcheck disable=SC2086
  run_in "$name" timeout 300 python3 -m pytest -q -x ${AB_TESTS:-tests/test_kernels_gpu.py} 2>&1 | tail -2
done
for fmt in ${FMTS:-bitmap tiled-csl}; do
  for sp in ${SPARSITIES:-0.8 0.9}; do
    for round in 1 2; do
      for name in "${names[@]}"; do
        run_in "$name" timeout 120 python3 benchmarks/time_across_n.py --fmt "$fmt" --sparsity "$sp" --ns "${NS:-1,16,32,64}" \
          ${AB_M:+--m $AB_M} ${AB_K:+--k $AB_K} ${AB_FORCE:+--force-sparse} \
          | grep "^|" | grep -v "N |\|---" | sed "s/^/$name $fmt $sp r$round /"
      done
    done
  done
done
