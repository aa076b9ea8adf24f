#!/usr/bin/env bash
# One benchmark command on the checked-out tree and on copies of it with patches applied, trees compiled at once first
# (session 63).  For kernel prototypes that the benchmark's own switches cannot reach (a constexpr, a new variant):
#   FLASH_LLM_COMMIT=<sha> TREE_PATCHES="a.patch b.patch" TREE_CMD="python3 benchmarks/dr_mma.py --ns 8" \
#     bash benchmarks/gpu_tree_ab.sh
# (patches under benchmarks/ab/; each tree's output in $OUT/tree_<name>.log, their tails printed in turn; TREE_ROUNDS
# runs the trees in turn that many times.)
set -uo pipefail
ROOT=$PWD
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
names=(base); dirs=("$ROOT")
for p in ${TREE_PATCHES:?TREE_PATCHES=<files in benchmarks/ab>}; do
  n=$(basename "$p" .patch); d=/tmp/tree_$n; rm -rf "$d"; mkdir -p "$d"
  cp -r "$ROOT/flash_llm" "$ROOT/benchmarks" "$ROOT/tests" "$d/"
  (cd "$d" && git apply "$ROOT/benchmarks/ab/$(basename "$p")") || { echo "--- $n: the patch does not apply"; continue; }
  names+=("$n"); dirs+=("$d")
done
for i in "${!dirs[@]}"; do  # every tree's kernels compiled before anything is timed (NVRTC: one thread a build)
  (cd "${dirs[$i]}" && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_tree_${names[$i]} timeout 300 python3 -m flash_llm.cli build \
    > "$OUT/build_${names[$i]}.log" 2>&1 || echo "--- ${names[$i]}: flash-llm build failed") &
done; wait
for r in $(seq "${TREE_ROUNDS:-1}"); do
  for i in "${!dirs[@]}"; do
    echo "=== ${names[$i]} (round $r)"
    (cd "${dirs[$i]}" && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_tree_${names[$i]} timeout ${TREE_TIMEOUT:-300} bash -c "$TREE_CMD") \
      > "$OUT/tree_${names[$i]}_r$r.log" 2>&1
    tail -n "${TREE_TAIL:-14}" "$OUT/tree_${names[$i]}_r$r.log"
  done
done
