#!/usr/bin/env bash
# The device call prepared for the prototypes in benchmarks/ab/ (one H200, about 9 minutes with every stage):
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_ab_next.sh [bitmap] [tcsl] [decoder] [stalls] [sanitize]
#   bitmap    the format-version-3 patches against the checked-out bitmap kernel (N = 1-64, 80 and 90 %)
#   tcsl      tcsl_pairs against the checked-out Tiled-CSL kernel
#   decoder   bitmap_decoder_gather at N = 128-512 (the large-N path), 80 %
#   stalls    benchmarks/gpu_stalls.sh 0.8 1 16 on the checked-out kernels
#   sanitize  benchmarks/gpu_sanitize.sh on the checked-out kernels (changed since its last run)
# Outputs (logs) under $OUT; the A/B tables are printed.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
export OUT
for stage in "${@:-bitmap tcsl decoder}"; do
  for s in $stage; do
    echo "=== $s"
    case $s in
      bitmap) FMTS=bitmap bash benchmarks/ab_kernel.sh benchmarks/ab/bitmap_v3_*.patch 2>&1 | tee "$OUT/ab_bitmap.log" ;;
      tcsl) FMTS=tiled-csl bash benchmarks/ab_kernel.sh benchmarks/ab/tcsl_pairs.patch 2>&1 | tee "$OUT/ab_tcsl.log" ;;
      decoder) FMTS=bitmap SPARSITIES=0.8 NS=128,256,512 bash benchmarks/ab_kernel.sh \
                 benchmarks/ab/bitmap_decoder_gather.patch 2>&1 | tee "$OUT/ab_decoder.log" ;;
      stalls) bash benchmarks/gpu_stalls.sh 0.8 1 16 2>&1 | tee "$OUT/stalls.log" ;;
      sanitize) bash benchmarks/gpu_sanitize.sh 2>&1 | tail -20 ;;
      *) echo "unknown stage $s (bitmap tcsl decoder stalls sanitize)" >&2; exit 2 ;;
    esac
  done
done
