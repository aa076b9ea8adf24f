#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over flash-llm's own kernels only (benchmarks/profile_kernel.py:
# both formats, split-K off and on, both decoders to dense), small shapes.
# CFGS (default "bitmap:1 bitmap:3 tiled-csl:1 tiled-csl:3"; "" for none) picks the spmm runs: format:splits[:N[:VAR=value]]
# (without N: N = 17 at 50 % and 3 at 90 %; VAR=value is set for that run, e.g. FLASH_LLM_WGMMA=0).  DECODERS=0
# skips the decoder runs.  EPILOGUES (default "norm norm_silu resid") picks the one-token epilogue runs (Tiled-CSL, N = 1,
# K = 1016, 3 splits; EPILOGUES="" for none; "silu": SiLU x up alone; EPILOGUE_N=8: at N = 8, `_nt1` and splitk_reduce).  ATTN=0 skips the decode-attention runs (bench_decode_attention.py
# --check-only, only the decode_attn kernels instrumented).  DR=0 skips the DeltaRows runs (benchmarks/delta_rows_check.py:
# both layouts, 1-8 tokens, every epilogue, only the delta_rows kernels instrumented).  DR_MMA=0 skips DeltaRows' tensor-core
# kernel (forced on at N = 16, X's ring on and off, session 69's _tmma; DR_MMA_ENVS picks).  The decoder runs include DeltaRows' (split and parts layouts, with
# and without its zero fill).  Output under $OUT/sanitize.log.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FLASH_LLM_CACHE=/tmp/flc
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
# compile the cubin into the cache first: compiled under memcheck, the first run can pass its 120 s (session 7:
# an empty memcheck line)
python3 benchmarks/profile_kernel.py --fmt bitmap --m 200 --k 1000 --n 3 --sparsity 0.9 --iters 1 >/dev/null 2>&1
for tool in memcheck racecheck; do
  for cfg in ${CFGS-bitmap:1 bitmap:3 tiled-csl:1 tiled-csl:3}; do
    IFS=: read -r fmt splits cfg_n cfg_env <<< "$cfg"
    for sp in 0.5 0.9; do
      n=${cfg_n:-$([ $sp = 0.5 ] && echo 17 || echo 3)}  # default: NT = 4 and NT = 1
      r=$(env ${cfg_env:-FLASH_LLM_SANITIZE=1} timeout 120 compute-sanitizer --tool $tool --report-api-errors no \
          --error-exitcode 9 python3 benchmarks/profile_kernel.py --fmt $fmt --m 200 --k 1000 --n $n --sparsity $sp \
          --splits $splits --iters 2 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|max err" | tr '\n' ' ')
      echo "$tool $fmt splits=$splits sparsity=$sp N=$n ${cfg_env:-}: $r" | tee -a "$OUT/sanitize.log"
    done
  done
  for ep in ${EPILOGUES-norm norm_silu resid}; do  # the one-token epilogues (n1s, splitk_reduce_{rms,rms_silu,resid})
    for sp in 0.5 0.9; do
      r=$(timeout 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python3 \
          benchmarks/profile_kernel.py --fmt tiled-csl --m 256 --k 1016 --n ${EPILOGUE_N:-1} --sparsity $sp --splits 3 \
          --iters 2 --epilogue $ep 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|max err" | tr '\n' ' ')
      echo "$tool tiled-csl epilogue=$ep splits=3 sparsity=$sp N=${EPILOGUE_N:-1}: $r" | tee -a "$OUT/sanitize.log"
    done
  done
  if [ "${ATTN:-1}" != 0 ]; then  # the decode attention (RoPE, the cache write, 4 and 40 chunks; batch 1 and 3)
    r=$(timeout 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 \
        --kernel-name kns=decode_attn python3 benchmarks/bench_decode_attention.py --check-only --rope --batches 1,3 \
        --slots 256,2500 --layers 1 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|Invalid" | tr '\n' ' ')
    echo "$tool decode attention: $r" | tee -a "$OUT/sanitize.log"
  fi
  if [ "${DR:-1}" != 0 ]; then  # DeltaRows: N = 1 and 2-8 tokens, split and parts layouts, windows up to 3072 columns
    r=$(timeout 300 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 \
        --kernel-name kns=delta_rows python3 benchmarks/delta_rows_check.py 2>&1 | \
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|WRONG|^fails" | tr '\n' ' ')
    echo "$tool delta-rows (delta_rows_check.py): $r" | tee -a "$OUT/sanitize.log"
  fi
  if [ "${DR_MMA:-1}" != 0 ]; then  # DeltaRows on the tensor cores (off by default: forced here), X's ring on / off
    for env in ${DR_MMA_ENVS:-FLASH_LLM_DR_MMA_XRING=1 FLASH_LLM_DR_MMA_XRING=0 FLASH_LLM_DR_MMA_TILE=1}; do
      r=$(env FLASH_LLM_DR_MMA_MIN=1 $env timeout 120 compute-sanitizer --tool $tool --report-api-errors no \
          --error-exitcode 9 python3 benchmarks/profile_kernel.py --fmt delta-rows --m 200 --k 1000 --n 16 \
          --sparsity 0.7 --parts 1 --iters 2 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|max err" | tr '\n' ' ')
      echo "$tool delta-rows mma N=16 $env: $r" | tee -a "$OUT/sanitize.log"
    done
  fi
  [ "${DECODERS:-1}" = 0 ] && continue
  for fmt in bitmap tiled-csl; do  # the decoders of the large-N path
    r=$(timeout 120 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 \
        python3 benchmarks/profile_kernel.py --fmt $fmt --m 200 --k 1000 --sparsity 0.7 --decode --iters 2 2>&1 | \
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|max err" | tr '\n' ' ')
    echo "$tool $fmt decode sparsity=0.7: $r" | tee -a "$OUT/sanitize.log"
  done
  # DeltaRows' decoder, with its zero fill and without (delta_rows_to_dense_nf; "t": through a tile a lane,
  # delta_rows_to_dense_nft; "p": that with its groups asked for a group ahead, _nftp; "r": the parts layout through its
  # rows, delta_rows_to_dense_pr, the default since session 69, which the others turn off; "s": that and the split
  # layout through bands of its windows, delta_rows_to_dense_sr; "b": _pr's blocks 64 columns of their rows; "k": _sr
  # skipping the groups outside its passes' bands of 64 columns, _srk, session 70; "q": that with 4 chunks of groups
  # in flight, _srk4, and _pr4 on every tile; "w": the placement by ranges of groups a warp, _srw at 64-column passes
  # and _prw, session 70), split and parts layouts
  for nf in ${DR_DECODERS:-0 1 t p r s b}; do
    for parts in ${DR_DECODE_PARTS:-1 4}; do
      r=$(env FLASH_LLM_DR_DENSE_NOFILL=$([ $nf = 0 ] && echo 0 || echo 1) \
          FLASH_LLM_DR_DENSE_ROWS=$(case $nf in r|s|b|k|q|w) echo 1;; *) echo 0;; esac) \
          FLASH_LLM_DR_DENSE_SPLIT_ROWS=$(case $nf in s|k|q|w) echo 1;; *) echo 0;; esac) \
          $(case $nf in k|q|w) echo FLASH_LLM_DR_PLACE_SKIP=1 FLASH_LLM_DR_DENSE_SR_BAND=64;; esac) \
          $([ $nf = w ] && echo FLASH_LLM_DR_PLACE_RANGES=1) \
          $([ $nf = q ] && echo FLASH_LLM_DR_PLACE_AHEAD=4 FLASH_LLM_DR_PLACE_AHEAD_PR_MIN_TILE=0) \
          FLASH_LLM_DR_DENSE_ROWS_BAND=$([ $nf = b ] && echo 64 || echo 0) \
          FLASH_LLM_DR_DENSE_TILED=$([ $nf = t ] || [ $nf = p ] && echo 1 || echo 0) \
          FLASH_LLM_DR_DENSE_T_PF=$([ $nf = p ] && echo 1 || echo 0) \
          timeout 120 compute-sanitizer --tool $tool --report-api-errors no \
          --error-exitcode 9 python3 benchmarks/profile_kernel.py --fmt delta-rows --m 200 --k 1000 --sparsity 0.7 \
          --parts $parts --decode --iters 2 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|max err" | tr '\n' ' ')
      echo "$tool delta-rows decode parts=$parts nofill=$nf sparsity=0.7: $r" | tee -a "$OUT/sanitize.log"
    done
  done
done
