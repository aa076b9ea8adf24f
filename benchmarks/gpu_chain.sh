#!/usr/bin/env bash
# Session 44's counter chains measured in one device call (benchmarks/ab/README.md items 8-9), about 5-6 minutes:
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_chain.sh
# 1. benchmarks/sync_cost.py: what a step boundary costs (plain / programmatic / counter / persistent barrier);
# 2. the GPU tests of the chain (same bits as griddepcontrol.wait, some launches chained) and of the DeltaRows engine;
# 3. benchmarks/dr_layouts.py --chain: Llama-3-8B's four projection kinds at 80 %, parts layout, chained or not;
# 4. bench_e2e.py at batch 1, DeltaRows 70 / 80 %, FLASH_LLM_COUNTER_WAIT unset / 1, two rounds (gpu_ab_next.sh e2eenv);
#    CHAIN_OPT=1: OPT-30B at 80 % too, one round (about 4 minutes more).
# Each stage under its own time limit; logs in $OUT (sync_cost.log, tests.log, layouts.log, e2eenv.log).
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export OUT PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
echo "=== sync_cost"; timeout 90 python3 benchmarks/sync_cost.py 2>&1 | tee "$OUT/sync_cost.log"
echo "=== tests"; timeout 240 python3 -m pytest -q -x --tb=short tests/test_delta_rows_gpu.py \
  -k "counter_chain or engine_graph" > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"
if ! tail -1 "$OUT/tests.log" | grep -q "passed" || tail -1 "$OUT/tests.log" | grep -q "failed\|error"; then
  echo "the chain's tests did not pass: no timing"; exit 1
fi
echo "=== dr_layouts --chain"; timeout 150 python3 benchmarks/dr_layouts.py --layers 8 --chain 2>&1 | tee "$OUT/layouts.log" | tail -10
echo "=== e2eenv"; E2E_FORMAT=delta-rows E2E_SPARSITIES=${CHAIN_SPARSITIES:-70,80} E2E_BATCHES=1 E2E_ROUNDS=${CHAIN_ROUNDS:-2} \
  E2E_ENVS=";FLASH_LLM_COUNTER_WAIT=1" timeout 330 bash benchmarks/gpu_ab_next.sh e2eenv 2>&1 | tr '\r' '\n' | \
  grep -v "DeltaRows layout" | grep "===\|---\|b=1 \|rror"
if [ "${CHAIN_OPT:-0}" = 1 ]; then  # OPT-30B too (its one-token layers: the split layout's _n1 kernels, chained)
  echo "=== e2eenv opt-30b"; E2E_MODEL=opt-30b E2E_FORMAT=delta-rows E2E_SPARSITIES=80 E2E_BATCHES=1 E2E_ROUNDS=1 \
    E2E_ENVS=";FLASH_LLM_COUNTER_WAIT=1" timeout 300 bash benchmarks/gpu_ab_next.sh e2eenv 2>&1 | tr '\r' '\n' | \
    grep -v "DeltaRows layout" | grep "===\|---\|b=1 \|rror"
fi
