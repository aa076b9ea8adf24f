#!/usr/bin/env bash
# Why the sparse kernels' warps wait: Nsight Compute's stall reasons per issued instruction, one launch each of the
# bitmap and Tiled-CSL kernels (9216 x 36864 fp16, OPT-66B down), at the given sparsity and N.  One GPU.
#   FLASH_LLM_COMMIT=<sha> [FMTS="bitmap tiled-csl"] [NCU_CLOCK=base] bash benchmarks/gpu_stalls.sh [SPARSITY=0.8] [N...=1 16]
#   (outputs under $OUT).  STALLS_ARGS="--m 28672 --k 4096 --epilogue norm_silu" passes other shapes / epilogues to
#   profile_kernel.py (STALLS_TAG names its logs); FMTS=delta-rows profiles DeltaRows (its split layout's kernels,
#   any N: STALLS_ARGS="--parts 1 --dtype bf16 --coded ..."; STALLS_KERNEL=<regex> profiles other kernel names, e.g.
#   delta_rows_parts for the parts layout; default "_spmm_").
#   NCU_BREAKDOWN=1 adds a run per configuration for L1/TEX's throughput broken into its sub-metrics (which pipe or
#   stage is busy) and the shared-memory tables (wavefronts and bank conflicts by instruction).
#   NCU_CLOCK=none profiles at the clocks the card runs (boost, as the benchmarks time it);
#   Nsight Compute's default, base, locks the SM clock at about 1.34 GHz on an H200, so a unit's busy percentage
#   there overstates how busy it is at 1.98 GHz: compare the two durations before calling a kernel SM-bound.
# Prints, per configuration, the stall reasons sorted by cycles per issued instruction (the WarpStateStats
# breakdown), with the duration, issue rate and occupancy.  For a prototype, run it from the tree
# benchmarks/ab_kernel.sh built (/tmp/ab_kernel/<name>) after an A/B call.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=${FLASH_LLM_CACHE:-/tmp/flc}
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
sp=${1:-0.8}; shift || true
ns=${*:-1 16}
# one launch of the configuration ($fmt, $n, $sp) under Nsight Compute, with the sections / metrics given
ncu_one() {
  # shellcheck disable=SC2086
  timeout 240 ncu --clock-control "${NCU_CLOCK:-base}" --target-processes all --kernel-name regex:"${STALLS_KERNEL:-_spmm_}" \
    --launch-skip 3 --launch-count 1 "$@" \
    python3 benchmarks/profile_kernel.py --fmt "$fmt" --n "$n" --sparsity "$sp" ${STALLS_ARGS:-}
}
for fmt in ${FMTS:-bitmap tiled-csl}; do
  for n in $ns; do
    log="$OUT/stalls_${fmt}_${sp}_n${n}_${NCU_CLOCK:-base}${STALLS_TAG:+_$STALLS_TAG}.txt"
    for metrics in 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum' \
                   'regex:smsp__pcsamp_warps_issue_stalled_.*'; do
      ncu_one --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section LaunchStats --section MemoryWorkloadAnalysis --metrics "$metrics" \
        > "$log" 2>&1 && grep -aq "stalled" "$log" && break
    done
    echo "=== $fmt, sparsity $sp, N = $n ${STALLS_ARGS:-} ($log)"
    grep -aE "^\s+Duration|SM Frequency|L1/TEX Cache Throughput|Compute \(SM\) Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Waves Per SM|Grid Size|Issued Warp Per Scheduler|No Eligible|Warp Cycles Per Issued|Mem Busy|Max Bandwidth|L1/TEX Hit Rate|^plan|^kernel|bank_conflicts|wavefronts_mem_shared|op_shared_ld" "$log" | head -24
    grep -aE "stalled" "$log" | awk '{v=$NF; gsub(",","",v); print v, $1}' | sort -gr | head -12
    if [ "${NCU_BREAKDOWN:-0}" = 1 ]; then  # which part of L1/TEX is busy: its throughput's sub-metrics, own run
      blog="${log%.txt}_l1.txt"
      ncu_one --section MemoryWorkloadAnalysis_Tables \
        --metrics breakdown:l1tex__throughput.avg.pct_of_peak_sustained_elapsed > "$blog" 2>&1
      echo "--- L1/TEX breakdown ($blog)"
      grep -aE "^\s+l1tex__|Shared (Load|Store)|Bank|Wavefronts|==ERROR" "$blog" | head -40
    fi
  done
done
