#!/usr/bin/env bash
# DeltaRows kernel patches A/B'd per decoder layer at batch 1 (benchmarks/dr_layouts.py), one device call:
#   LAB_VARIANTS="w8:drp_w8.patch xa:drp_xasync.patch both:drp_w8.patch+drp_xasync.patch" bash benchmarks/gpu_layouts_ab.sh
# Each variant is a copy of the tree with its patches (files under benchmarks/ab/, '+' between them) applied by
# `git apply`.  First every variant's GPU tests ($LAB_TESTS, default the DeltaRows GPU tests matching $LAB_K, default
# "parts"), all variants at once (compiles on the CPUs, one GPU), then dr_layouts.py on the base tree and each variant
# in turn, $LAB_ROUNDS times (default 2), --layers $LAB_LAYERS (default 8), $LAB_MODEL (default llama-3-8b).  Logs in
# $OUT (tests_<name>.log, layouts_<name>_r<round>.log; $LAB_ARGS more dr_layouts.py options, e.g. --skip-check) and the parts column of every run printed as one table last.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
ROOT=$PWD
variants="base ${LAB_VARIANTS:?LAB_VARIANTS=\"name:a.patch+b.patch ...\"}"
for v in $variants; do
  name=${v%%:*}; dir=/tmp/lab/$name; rm -rf "$dir"; mkdir -p "$dir"
  tar --exclude=./.git --exclude=./.venv --exclude=./benchmarks/out --exclude=./benchmarks/results -cf - . | tar -C "$dir" -xf -
  if [ "$name" != base ]; then
    IFS=+ read -ra ps <<< "${v#*:}"
    for p in "${ps[@]}"; do (cd "$dir" && git apply "$ROOT/benchmarks/ab/$p") || { echo "$p does not apply ($name)"; exit 1; }; done
    (cd "$dir" && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_lab_$name timeout "${LAB_TEST_TIMEOUT:-240}" python3 -m pytest -q -x \
      --tb=short ${LAB_TESTS:-tests/test_delta_rows_gpu.py} -k "${LAB_K:-parts}" > "$OUT/tests_$name.log" 2>&1; \
      echo "tests $name: $(tail -1 "$OUT/tests_$name.log")") &
  fi
done
wait
for r in $(seq 1 "${LAB_ROUNDS:-2}"); do
  for v in $variants; do
    name=${v%%:*}
    (cd /tmp/lab/$name && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_lab_$name timeout "${LAB_TIMEOUT:-120}" python3 \
      benchmarks/dr_layouts.py --model "${LAB_MODEL:-llama-3-8b}" --layers "${LAB_LAYERS:-8}" ${LAB_ARGS:-} > "$OUT/layouts_${name}_r$r.log" 2>&1)
    echo "--- $name r$r: $(grep -c ' ok$' "$OUT/layouts_${name}_r$r.log") kinds checked ok"
  done
done
echo "=== parts layout, us a layer (dr_layouts.py's two inner rounds each)"
for v in $variants; do
  name=${v%%:*}
  for r in $(seq 1 "${LAB_ROUNDS:-2}"); do
    awk -v n="$name r$r" '/^round/ {k=$3; t[k]=t[k] " " $(NF-1)} END {printf "%-10s", n; for (k in t) printf "  %s:%s", k, t[k]; print ""}' \
      "$OUT/layouts_${name}_r$r.log"
  done
done
