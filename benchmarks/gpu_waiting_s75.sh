#!/usr/bin/env bash
# The waiting calls of session 75 (benchmarks/ab/README.md, top), each step under its own time limit, its whole log
# in $OUT/<step>.log (tee: a call stopped at its limit still returns what is under $OUT), its tail printed:
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s75.sh suite1        (about 8 minutes, any card)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s75.sh suite2        (about 8 minutes, any card)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s75.sh trace         (about 3 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s75.sh s75tests spmm (about 8 minutes, an H100)
# suite1, suite2: the test files session 75 did not get through on a GPU (call 6 lost its output), in two halves,
#          -n 6 with pytest-timeout's --timeout 300 a test (the image has pytest-xdist and pytest-timeout).
# trace:   the decode attention's phases inside the batch-1 decode step (attn_trace.py --step, Llama-3-8B bf16 80 %
#          DeltaRows) on a copy of the tree with benchmarks/diag/attn_trace.patch applied: where its 8.2-8.5 us of a
#          layer's critical path go (resident blocks waiting, the wait's release, each phase).
# s75tests: the GPU side of session 75's CPU changes (the fused ops' forward-mode tangents, kernels.dispatches_sparse,
#          the tensor-parallel CLI paths at world size 1).
# spmm:    bench_spmm.py --quick (both formats, bf16): its rows' dense_drift and issue 3's verdicts (target_checks).
# Needs no carried cubins: the device's NVRTC (13.0) compiles spmm.cu in about 1.5 s.  PYTHONPATH is the tree (a
# `pip install -e .` there did not make flash_llm importable for benchmarks/*.py in session 75).
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
ROOT=$PWD
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DONE="test_engine_edge test_parallel_edge test_checkpoint_cli test_hf_edge test_engine test_env_switches
      test_decode_attention test_kernels_gpu test_ops_edge test_engine_gpu test_delta_rows_gpu"

rest() {  # the test files not in $DONE, sorted; half 1 or 2
  local files=() f
  for f in tests/test_*.py; do
    [[ " $(echo $DONE) " == *" $(basename "$f" .py) "* ]] || files+=("$f")
  done
  local n=${#files[@]} h=$(( (${#files[@]} + 1) / 2 ))
  if [ "$1" = 1 ]; then printf '%s\n' "${files[@]:0:$h}"; else printf '%s\n' "${files[@]:$h:$n}"; fi
}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
}

for s in "$@"; do
  case $s in
    suite1|suite2)
      mapfile -t files < <(rest "${s#suite}")
      step "$s" 520 python3 -m pytest -q -rf -n 6 --timeout 300 -p no:cacheprovider "${files[@]}" ;;
    trace)
      # (a copy of the working tree, not `git archive`: the device's .git may be an older commit's)
      tree=$(mktemp -d)
      cp -r "$ROOT/flash_llm" "$ROOT/tests" "$tree/" && mkdir -p "$tree/benchmarks" &&
        cp "$ROOT"/benchmarks/*.py "$ROOT/benchmarks/diag/attn_trace.patch" "$tree/benchmarks/" &&
        (cd "$tree" && git apply benchmarks/attn_trace.patch &&
         PYTHONPATH=$tree step trace 400 python3 benchmarks/attn_trace.py --step --model llama-3-8b \
           --format delta-rows --sparsity 0.8 --dtype bf16 --fuse --merge) ;;
    s75tests)
      step s75tests 400 python3 -m pytest -q -rf -n 4 --timeout 300 -p no:cacheprovider tests/test_nn_fixes.py \
        tests/test_torch_edge.py tests/test_plan.py tests/test_tp_fixes.py tests/test_prune_fixes.py \
        tests/test_config_compat.py ;;
    spmm)
      step spmm 300 python3 benchmarks/bench_spmm.py --quick --dtypes bf16 --out "$OUT/spmm" --overwrite ;;
    *) echo "unknown step $s" ;;
  esac
done
