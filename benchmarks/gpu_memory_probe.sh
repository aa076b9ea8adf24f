#!/usr/bin/env bash
# Where the bitmap kernel's bytes come from as N grows (device machine, one GPU): Nsight Compute counters of
# one launch per N on a 9216 x 36864 fp16 weight at 80 % sparsity.  Each warp loads its own X fragments (the
# 4 warps of a block read the same X rows), so X traffic from L2/L1 grows with N while the weight bytes do
# not; this measures how much.  Prints a table; the raw CSV goes to $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
M="gpu__time_duration.sum,dram__bytes_read.sum,lts__t_bytes.sum,lts__t_sectors_srcunit_tex_op_read.sum"
M="$M,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sector_pipe_lsu_mem_global_op_ld_hit_rate.pct"
M="$M,lts__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__throughput.avg.pct_of_peak_sustained_elapsed"
M="$M,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed"
for n in ${NS:-1 8 16 32 64}; do
  timeout 60 ncu --clock-control none --csv --page raw --kernel-name regex:"_spmm_" --launch-skip 2 --launch-count 1 \
    --metrics "$M" python3 benchmarks/profile_kernel.py --fmt bitmap --n $n --sparsity ${SPARSITY:-0.8} \
    > "$OUT/probe_n$n.csv" 2>&1  # one file per N: the tool brings back 8
done
# the same shapes timed with CUDA events (median of 20 after warm-up), against cuBLAS on the dense weight
timeout 90 python3 benchmarks/time_across_n.py --sparsity ${SPARSITY:-0.8}
python3 - "$OUT" <<'PY'
import csv, glob, io, os, re, sys
out = sys.argv[1]
print("| N | us | DRAM read MB | L2 bytes MB | L2 read from L1 MB | L1 global-load hit % | L2 % | L1 % | DRAM % | SM % | warp instr (M) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(out, "probe_n*.csv")), key=lambda p: int(re.findall(r"n(\d+)", p)[-1])):
    text = open(path).read()
    lines = [l for l in text.splitlines() if l.startswith('"')]
    if len(lines) < 3:
        print(f"| {path}: no data |"); continue
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    head, units, vals = rows[0], rows[1], rows[2]
    g = lambda k: float(vals[head.index(k)].replace(",", "")) if k in head else float("nan")
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1, "us": 1, "msecond": 1e3, "ms": 1e3}
    us = g("gpu__time_duration.sum") * scale.get(units[head.index("gpu__time_duration.sum")], 1)
    mb = lambda k: g(k) * {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(units[head.index(k)], 1) / 1e6 if k in head else float("nan")
    n = re.findall(r"n(\d+)", path)[-1]
    print(f"| {n} | {us:.0f} | {mb('dram__bytes_read.sum'):.0f} | {mb('lts__t_bytes.sum'):.0f} | "
          f"{g('lts__t_sectors_srcunit_tex_op_read.sum') * 32 / 1e6:.0f} | "
          f"{g('l1tex__t_sector_pipe_lsu_mem_global_op_ld_hit_rate.pct'):.0f} | "
          f"{g('lts__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | {g('l1tex__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | "
          f"{g('dram__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | {g('sm__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | "
          f"{g('smsp__inst_executed.sum') / 1e6:.1f} |")
PY
