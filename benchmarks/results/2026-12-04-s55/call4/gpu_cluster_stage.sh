#!/usr/bin/env bash
# Session 55: benchmarks/ab/drp_cluster_stage.patch (X staged once a cluster of 4 / 8 blocks) in one device call.
# Its DeltaRows parts / coded GPU tests with clusters of 8 and 4, then dr_layouts.py (fp16 plain, checked against the
# fp32 product) and dr_coded.py (bf16, coded against plain bit for bit) on the tree and on the patched tree at 0 / 4 / 8.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
ROOT=$PWD; T=/tmp/clstage
rm -rf $T && mkdir -p $T && tar --exclude=./.git --exclude=./.venv --exclude=./benchmarks/out --exclude=./benchmarks/results \
  -cf - . | tar -C $T -xf - && (cd $T && git apply "$ROOT/benchmarks/ab/drp_cluster_stage.patch") || { echo "patch"; exit 1; }
for cl in ${CL_TEST:-8}; do (cd $T && FLASH_LLM_DELTA_PARTS_CLUSTER=$cl PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_cl timeout 200 python3 -m pytest \
  -q -x --tb=short tests/test_delta_rows_gpu.py -k "${CL_K:-parts or coded or static_weights}" 2>&1 | tail -3 | sed "s/^/tests x$cl: /"); done
for r in 1 2; do
  for v in base:0 cl:0 cl:4 cl:8; do
    d=$ROOT; [ "${v%%:*}" = cl ] && d=$T
    (cd $d && FLASH_LLM_DELTA_PARTS_CLUSTER=${v#*:} PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_${v%%:*} timeout 120 python3 \
      benchmarks/dr_layouts.py --layers 8 > "$OUT/layouts_${v/:/_}_r$r.log" 2>&1
     FLASH_LLM_DELTA_PARTS_CLUSTER=${v#*:} PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_${v%%:*} timeout 120 python3 \
      benchmarks/dr_coded.py --sparsities 0.8 > "$OUT/coded_${v/:/_}_r$r.log" 2>&1)
    echo "$v r$r layouts: $(grep -c ' ok$' "$OUT/layouts_${v/:/_}_r$r.log") ok, $(grep 'round 1: qkv+o' "$OUT/layouts_${v/:/_}_r$r.log" | sed 's/.*parts/parts/')" \
      " | coded: $(grep '| layer |' "$OUT/coded_${v/:/_}_r$r.log" | head -1)"
  done
done
