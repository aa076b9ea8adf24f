#!/usr/bin/env bash
# Device calls for tensor parallelism (issues 7 and 8) on a machine of 2 or 4 GPUs (nvidia-h200-x2 / -x4),
# with two one-GPU jobs of issues 4 and 6 beside them.  Stages, run in the order given:
#   nccl      a 2-GPU all-reduce, eager and in a CUDA graph (nccl_check.py)
#   tests1    tests/test_parallel_gpu.py at world size 1 (GPU 0)
#   tests2    the 2-GPU cases of tests/test_parallel.py (stacks printed if a rank hangs)
#   ckpt-bg   the checkpoint benchmark (Llama-3-8B, issue 6) in the background on the last GPU; the next
#             timing stage waits for it
#   tpcheck   tp_check.py: Llama-3-8B on 2 GPUs against one GPU, dense and 80 %
#   tp66      OPT-66B: dense on 2 GPUs against 80 % on 2 and on 1
#   tp175     OPT-175B: dense on 4 GPUs (2 when only 2: it does not fit, and is reported so) against 80 % on 2, 1
#   e2e66     OPT-66B on one GPU capped at 80 GB (an H100's memory): dense against 80 % (issue 4)
# e.g.  bash benchmarks/gpu_tp.sh tests ckpt-bg tpcheck tp66
# Outputs under $OUT (or benchmarks/out), packed into one archive at the end (the tool brings back 8 files).
# FLASH_LLM_COMMIT names the commit (the device copy's .git is stale).  BUDGET_S (default 560) bounds the call.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc NCCL_NVLS_ENABLE=0 \
       TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>&1 | head -8
python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version())"
python3 -c "from flash_llm.kernels._build import compile_kernels as c; r=c('sm_90'); print('compiled', len(r.cubin))"
END=$(( $(date +%s) + ${BUDGET_S:-560} ))  # every step's timeout is cut to what is left of the call
left() { local l=$(( END - $(date +%s) )); echo $(( l > 10 ? l : 10 )); }
TRUN="python3 -m torch.distributed.run --standalone --nproc-per-node"  # a command, so that timeout can run it
B="--batches 8,16,32,64 --prompt 128 --new 128 --no-progress"

NG=$(nvidia-smi -L | wc -l)
bg=""
wait_bg() { if [ -n "$bg" ]; then wait $bg; bg=""; fi; }
for stage in "$@"; do
  echo "=== $stage ($(left) s left)"
  case $stage in
    nccl)
      timeout 90 $TRUN 2 benchmarks/nccl_check.py 2>&1 | tail -4 ;;
    tests1)
      CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q tests/test_parallel_gpu.py 2>&1 | tee "$OUT/tp_tests.log" | tail -4 ;;
    tests2)
      # the 2-GPU cases of the torchrun test; each rank prints its stack and exits if still running after 90 s
      FLASH_LLM_TP_WORKER_DUMP_S=90 FLASH_LLM_TP_TEST_TIMEOUT_S=120 timeout 170 python3 -m pytest -q -x -m gpu \
        tests/test_parallel.py 2>&1 | tee -a "$OUT/tp_tests.log" | tail -60 ;;
    ckpt-bg)
      (CUDA_VISIBLE_DEVICES=$((NG - 1)) timeout $(left) python3 benchmarks/bench_checkpoint.py --model llama-3-8b \
         --no-hf --workdir /tmp/ckpt --out "$OUT/checkpoint" > "$OUT/checkpoint.log" 2>&1
       echo "checkpoint rc=$?" >> "$OUT/checkpoint.log") &
      bg=$! ;;
    tpcheck)
      CUDA_VISIBLE_DEVICES=0,1 timeout $(left) $TRUN 2 benchmarks/tp_check.py --model llama-3-8b --out "$OUT" \
        > "$OUT/tp_check.log" 2>&1
      tail -5 "$OUT/tp_check.log" ;;
    tp66)
      wait_bg
      CUDA_VISIBLE_DEVICES=0,1 timeout $(left) $TRUN 2 benchmarks/bench_e2e.py --tp 2,1 --tp-dense 2 --tp-sparse 2,1 \
        --models opt-66b --sparsities 0,80 $B --repeats 2 --out "$OUT/tp_opt66b" > "$OUT/tp_opt66b.log" 2>&1
      tail -22 "$OUT/tp_opt66b.log" ;;
    tp175)
      wait_bg
      if [ "$NG" -ge 4 ]; then sizes="--tp 4,2,1 --tp-dense 4"; n=4; else sizes="--tp 2,1 --tp-dense 2"; n=2; fi
      timeout $(left) $TRUN $n benchmarks/bench_e2e.py $sizes --tp-sparse 2,1 --models opt-175b --sparsities 0,80 \
        $B --repeats 2 --out "$OUT/tp_opt175b" > "$OUT/tp_opt175b.log" 2>&1
      tail -26 "$OUT/tp_opt175b.log" ;;
    e2e66)
      wait_bg
      CUDA_VISIBLE_DEVICES=0 timeout $(left) python3 benchmarks/bench_e2e.py --models opt-66b --sparsities 0,80 \
        --batches 1,8,16,32,64 --memory-limit-gb 80 --no-hf --no-progress --out "$OUT/e2e_opt66b_80gb" \
        > "$OUT/e2e_opt66b_80gb.log" 2>&1
      tail -22 "$OUT/e2e_opt66b_80gb.log" ;;
    *) echo "unknown stage $stage (nccl tests1 tests2 ckpt-bg tpcheck tp66 tp175 e2e66)" >&2; exit 2 ;;
  esac
done
wait_bg
[ -f "$OUT/checkpoint.log" ] && { echo "=== checkpoint"; tail -25 "$OUT/checkpoint.log"; }
# the device tool brings back at most 8 files: everything in one archive, the logs beside it
(cd "$OUT" && tar czf /tmp/tp_results.tgz . && mkdir -p /tmp/logs && cp *.log /tmp/logs/ 2>/dev/null;
 rm -rf ./* && mv /tmp/tp_results.tgz . && ls /tmp/logs/*.log >/dev/null 2>&1 && cp /tmp/logs/*.log . ; ls)
