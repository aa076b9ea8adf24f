#!/usr/bin/env bash
# An end-to-end A/B of two package trees, interleaved, one process each (session 46: the step's bookkeeping):
#   rm -rf ab_base && mkdir ab_base && git archive <base sha> flash_llm | tar -x -C ab_base   (git ignores /ab_base/)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_step_ab.sh      (device tool: carry ["ab_base"])
# Each round runs bench_e2e.py (Llama-3-8B, DeltaRows, $AB_SPARSITIES at $AB_BATCHES) on ab_base/ and on this tree.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for r in ${AB_ROUNDS:-1 2}; do
  for t in base new; do
    root=$PWD; [ "$t" = base ] && root=$PWD/ab_base
    echo "--- round $r, $t"
    PYTHONPATH="$root:$PWD" timeout "${AB_TIMEOUT:-150}" python3 benchmarks/bench_e2e.py --models llama-3-8b --no-progress \
      --fuse --merge --no-hf --repeats 3 --format delta-rows --batches "${AB_BATCHES:-1}" \
      --sparsities "${AB_SPARSITIES:-0,80}" --out "/tmp/e2e_ab_${t}_$r" 2>&1 | tr '\r' '\n' | grep "b=\|rror"
  done
done 2>&1 | tee "$OUT/ab.log"
