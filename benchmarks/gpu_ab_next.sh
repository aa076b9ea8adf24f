#!/usr/bin/env bash
# The next device call (one H200):
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_ab_next.sh [tests] [ab] [probe] [across] [pdl] [profile] [sdpa] [e2e] [e2eopt] [e2epdl] [spmm] [stalls] [sanitize] [splits] [attn] [attnab] [e2eab] [e2eenv] [profenv] [dual] [cross] [drtok] [drexpand] [drmma]
#   tests     the GPU kernel, engine and decode-attention tests on the checked-out tree (about 2 minutes; TESTS_K=<pytest -k
#             expression> for a subset, TESTS_FILES=<test files> for others, under TESTS_TIMEOUT seconds, default 300);
#             the whole pytest output, tracebacks included, in $OUT/tests.log
#   ab        the prototypes waiting in benchmarks/ab/ (about 3 minutes each): Tiled-CSL on 9216 x 36864 at 80 and
#             90 %, then on 4096 x 14336 (Llama-3-8B down), at N = $NS (default 1,8,16,32); AB_FORCE=1 times the
#             sparse kernel at every N (tcsl_multiwarp: NS=32,64,128,256 AB_FORCE=1); AB_SPARSITIES (default "0.8 0.9"),
#             AB_FMTS (default tiled-csl; "bitmap tiled-csl" for both), AB_SMALL=0 skips 4096 x 14336, AB_PATCHES
#             (default "benchmarks/ab/*.patch") picks the patches
#   probe     benchmarks/kernel_probe.py and the tests matching $PROBE_TESTS (default "above_32") on a copy of the
#             tree, with benchmarks/ab/$PROBE_PATCH applied if set (a prototype's first run: where do its values
#             land?; PROBE_FMT=bitmap probes that format, PROBE_NS="1 8 64" other N); if it fails, a later ab stage
#             is skipped
#   across    time_across_n.py, Tiled-CSL at 80 and 90 %, N = 1-32, on 9216 x 36864 and 4096 x 14336 (2 minutes)
#   profile   profile_decode.py: the kernels of one Llama-3-8B decode step, dense and Tiled-CSL (PROFILE_FORMAT) 80 % (PROFILE_SPARSITIES),
#             batch $PROFILE_BATCH (default 1)
#   profenv   profile_decode.py once per setting of PROFILE_ENVS (as E2E_ENVS: ";A=1" is the defaults, then A=1), on
#             $PROFILE_MODEL (default llama-3-8b), $PROFILE_FORMAT (default tiled-csl) at $PROFILE_SPARSITY (default 0.8),
#             batch $PROFILE_BATCH (default 1), $PROFILE_EXTRA (e.g. "--dtype bf16"; default fp16), fused and merged: the
#             groups, the layer timeline, $OUT/profenv_<i>.json
#   e2e       bench_e2e.py on Llama-3-8B, Tiled-CSL (E2E_FORMAT=bitmap or delta-rows for the others; also in e2eab, e2eenv) 0 / 80 / 90 % (E2E_SPARSITIES),
#             batch 1 / 8 / 16 (E2E_BATCHES), fused and merged (3 minutes)
#   pdl       time_across_n.py on 4096 x 14336 (Tiled-CSL 80 %) with FLASH_LLM_PDL=0 and 1 (1 minute)
#   sdpa      profile_decode.py, Tiled-CSL 80 %, batch 1, with SDPA's default backend, efficient and math
#   e2eopt    bench_e2e.py on OPT-30B, Tiled-CSL (E2E_FORMAT) 0 / 80 % (E2E_SPARSITIES), batch 1 / 8 / 16 (E2E_BATCHES), fused
#             and merged (the fused OPT path), under E2E_TIMEOUT seconds (default 400)
#   e2epdl    bench_e2e.py on Llama-3-8B, Tiled-CSL 80 %, batch 1 / 8, with $PDL_VAR (default FLASH_LLM_PDL) = 0 and 1,
#             twice (PDL_VAR=FLASH_LLM_PDL_SPMM: the spmm's own programmatic launch under static_weights)
#   spmm      bench_spmm.py --dtypes fp16 (both formats, 20 shapes; 3 minutes; SPMM_DTYPES="fp16 bf16" for both, one run each)
#   stalls    benchmarks/gpu_stalls.sh $STALLS_SP (default 0.8) $STALLS_NS (default "1 16") on the checked-out kernels
#             (FMTS=tiled-csl for one format; NCU_CLOCK=none at the card's own clocks)
#   sanitize  benchmarks/gpu_sanitize.sh on the checked-out kernels
#   attn      tests/test_decode_attention.py, bench_decode_attention.py, then bench_e2e.py on Llama-3-8B (Tiled-CSL, E2E_SPARSITIES, E2E_BATCHES
#             default 1,16,64) with FLASH_LLM_DECODE_ATTENTION=0 and 1 (the decode-attention kernel; 5 minutes)
#   splits    benchmarks/splits_sweep.py $SPLITS_ARGS: every split count against the heuristic's on Llama-3-8B's layers
#   attnab    the decode-attention prototype benchmarks/ab/$ATTN_PATCH against the tree: tests/test_decode_attention.py on
#             both, then bench_decode_attention.py --rope (ATTN_SLOTS default 256,2048; ATTN_BATCHES 1,16,64), base and
#             patch interleaved, twice (about 3 minutes); ATTN_TEST_TREES="patch" tests only the patched tree ("" neither)
#   e2eab     an engine or kernel patch benchmarks/ab/$E2E_PATCH against the tree end to end: its GPU tests ($E2E_TESTS,
#             default the kernel and engine suites; E2E_K=<pytest -k expression> for a subset), then bench_e2e.py on Llama-3-8B, Tiled-CSL $E2E_SPARSITIES (default
#             80), batches $E2E_BATCHES (default 1,16), base and patch interleaved, twice (about 6 minutes)
#   e2emulti  the base tree and one tree per patch of E2E_PATCHES ("a.patch b.patch", paths under benchmarks/ab/, each
#             applied alone): each patched tree's tests ($E2E_TESTS, E2E_K; E2E_TESTS=- none) and every tree's `flash-llm build`
#             (the kernels compiled before any timing), then bench_e2e.py on every tree in turn,
#             E2E_ROUNDS times (default 1), each run under E2E_TIMEOUT seconds (default 150), its lines labelled with
#             the patch's file name, its outputs in $OUT/e2em_<tree>_r<round>/ (tree 0 the base)
#   e2eenv    bench_e2e.py on Llama-3-8B, Tiled-CSL $E2E_SPARSITIES (default 80), batches $E2E_BATCHES (default 1,16), once per
#             setting of E2E_ENVS (";A=1 B=0;A=0": settings separated by ';', an empty one for the defaults), in order,
#             E2E_ROUNDS times (default 1), each run under E2E_TIMEOUT seconds (default 200): switches of the checked-out tree A/B'd end to end in one process each
#   dual      Engine(delta_layout="dual") against "auto", one engine of max_batch $DUAL_MAX (default 16) a batch: the GPU
#             tests of both (-k "dual or delta_layout"), then bench_e2e.py on $E2E_MODEL (default Llama-3-8B), DeltaRows
#             $E2E_SPARSITIES (default 80), batches $E2E_BATCHES (default 1,2,4,16), each layout in turn (about 4 minutes)
#   cross     the wg32x2 / nt4 crossover at N = 17-32: time_across_n.py with FLASH_LLM_TCSL_WG32_MIN_DENSITY = 1 (always
#             nt4) and = 0 (always wg32x2), 9216 x 36864 at CROSS_SPARSITIES (default "0.7 0.8 0.9"), 4096 x 14336 at 80 %
#   drtok     benchmarks/dr_parts_tokens.py on DeltaRows' layers of $DRTOK_MODELS (default "llama-3-8b opt-30b") at
#             $DRTOK_SPARSITY (default 0.8), N = $DRTOK_NS (default 2,3), with $DRTOK_ARGS (default "--atomics --pdl": the
#             split layout's reduction against its atomics, launched as the engine launches them; about 30 s a model)
#   drexpand  benchmarks/dr_expand.py: the DeltaRows expansion (the prefill's large-N path) on OPT-30B's and Llama-3-8B's
#             layers against the zero fill and cuBLAS at N = 128, $DREXP_DTYPE (default bf16), $DREXP_KERNELS (default
#             the applied kernel at 4 warps a block and delta_rows_to_dense_nf at 4 and 1; "name:warps,..." for variants
#             in spmm.cu; about 40 s)
#   drmma     benchmarks/dr_mma.py: DeltaRows' tensor-core kernel at N = $DRMMA_NS (default 8,16,32) against the multi-token
#             kernel, Tiled-CSL and cuBLAS on Llama-3-8B's and OPT-30B's layers ($DRMMA_SHAPES, default llama,opt),
#             $DRMMA_DTYPE (default bf16), sparsity $DRMMA_SP (default 0.8); first (DRMMA_DIAG=0: not)
#             benchmarks/diag/dr_mma_diag.py, every wrong case of the kernel listed
# Outputs (logs) under $OUT; the A/B tables are printed. bench_e2e's plots, CSVs and summaries are deleted at the end
# (GPU_AB_KEEP_ALL=1 keeps them): the device tool brings back only a few files.
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # (absolute: stages run in copies of the tree)
export OUT PYTHONPATH=$PWD
ROOT=$PWD
# copy_tree DIR: a copy of the tree (without .git, .venv and the benchmarks' outputs) in DIR
copy_tree() {
  mkdir -p "$1" && tar --exclude=./.git --exclude=./.venv --exclude=./benchmarks/out --exclude=./benchmarks/results \
    -cf - . | tar -C "$1" -xf -
}
# two_trees DIR PATCH: copies of the tree in DIR/base and DIR/patch, benchmarks/ab/PATCH applied to the second
two_trees() {
  rm -rf "$1" && for v in base patch; do copy_tree "$1/$v"; done
  (cd "$1/patch" && git apply "$ROOT/benchmarks/ab/$2") || { echo "$2 does not apply"; return 1; }
}
# llama_e2e SECONDS ARGS...: bench_e2e.py on Llama-3-8B (E2E_MODEL=opt-30b etc. for another model; e2eab, e2emulti and
# e2eenv run through it), fused and merged, no HF baseline, 2 repeats (ARGS: --format, --sparsities, --batches,
# --out...), under a time limit; variables set before it reach bench_e2e.py, and E2E_EXTRA's words its command line
# (E2E_EXTRA="--delta-layout keep": DeltaRows weights as encoded, whatever the batch)
llama_e2e() {
  # shellcheck disable=SC2086
  timeout "$1" python3 benchmarks/bench_e2e.py --models "${E2E_MODEL:-llama-3-8b}" --no-progress --fuse --merge --no-hf --repeats 2 "${@:2}" ${E2E_EXTRA:-}
}
for stage in "${@:-tests ab}"; do
  for s in $stage; do
    echo "=== $s"
    case $s in
      ab) # shellcheck disable=SC2086
          if ! ls ${AB_PATCHES:-benchmarks/ab/*.patch} >/dev/null 2>&1; then echo "no patches waiting in benchmarks/ab"
          elif [ -n "${PROBE_PATCH:-}" ] && [ ! -e /tmp/probe/ok ]; then echo "the probe of $PROBE_PATCH failed: no A/B"; else
           { FMTS=${AB_FMTS:-tiled-csl} SPARSITIES="${AB_SPARSITIES:-0.8 0.9}" NS=${NS:-1,8,16,32} bash benchmarks/ab_kernel.sh ${AB_PATCHES:-benchmarks/ab/*.patch}
             [ "${AB_SMALL:-1}" = 0 ] || AB_TESTS="tests/test_plan.py" FMTS=tiled-csl AB_M=4096 AB_K=14336 SPARSITIES=0.8 \
               NS=${NS:-1,8,16,32} bash benchmarks/ab_kernel.sh ${AB_PATCHES:-benchmarks/ab/*.patch}
           } 2>&1 | tee "$OUT/ab.log"; fi ;;
      probe) { rm -rf /tmp/probe && mkdir -p /tmp/probe && tar --exclude=./.git --exclude=./benchmarks/out -cf - . | \
               tar -C /tmp/probe -xf - && cd /tmp/probe && { [ -z "${PROBE_PATCH:-}" ] || git apply "$OLDPWD/benchmarks/ab/$PROBE_PATCH"; } && \
               export PYTHONPATH=/tmp/probe FLASH_LLM_CACHE=/tmp/flc_probe &&
               timeout 150 python3 benchmarks/kernel_probe.py --fmt ${PROBE_FMT:-tiled-csl} --n ${PROBE_NS:-64 128 256} &&
               timeout 60 python3 benchmarks/kernel_probe.py --fmt ${PROBE_FMT:-tiled-csl} --m 128 --k 128 --n 128 \
                 --splits 1 2 &&
               timeout 120 python3 -m pytest -q -x --tb=short tests/test_kernels_gpu.py -k "${PROBE_TESTS:-above_32}" \
                 > /tmp/probe/tests.log 2>&1; r=$?; tail -25 /tmp/probe/tests.log; [ $r = 0 ] && touch /tmp/probe/ok
               cd "$OLDPWD"; } 2>&1 | tee "$OUT/probe.log" ;;
      across) for shape in "9216 36864" "4096 14336"; do read -r M K <<< "$shape"
                for sp in 0.8 0.9; do timeout 100 python3 benchmarks/time_across_n.py --fmt tiled-csl --m $M --k $K \
                  --sparsity $sp --ns 1,8,16,32; done; done 2>&1 | tee "$OUT/across.log" ;;
      profile) for sp in ${PROFILE_SPARSITIES:-0 0.8}; do timeout 150 python3 benchmarks/profile_decode.py --model llama-3-8b \
                 --format ${PROFILE_FORMAT:-tiled-csl} --sparsity $sp --batch ${PROFILE_BATCH:-1} --fuse --merge --out "$OUT/profile_$sp.json"; done \
                 2>&1 | tee "$OUT/profile.log" ;;
      profenv) { IFS=';' read -ra envs <<< "${PROFILE_ENVS:-};"; i=0
                 for e in "${envs[@]}"; do i=$((i + 1)); echo "--- ${PROFILE_MODEL:-llama-3-8b}: ${e:-defaults}"
                   (for v in $e; do export "$v"; done; timeout 200 python3 benchmarks/profile_decode.py --model \
                     ${PROFILE_MODEL:-llama-3-8b} --format ${PROFILE_FORMAT:-tiled-csl} --sparsity ${PROFILE_SPARSITY:-0.8} \
                     --batch ${PROFILE_BATCH:-1} ${PROFILE_EXTRA:-} --fuse --merge --out "$OUT/profenv_$i.json" 2>&1 | grep -v "^ *[0-9]* us \|arn")
                 done; } 2>&1 | tee "$OUT/profenv.log" ;;
      e2e) llama_e2e 280 --format ${E2E_FORMAT:-tiled-csl} --sparsities ${E2E_SPARSITIES:-0,80,90} \
             --batches ${E2E_BATCHES:-1,8,16} --out "$OUT/e2e_tcsl" 2>&1 | tee "$OUT/e2e_tcsl.log" | grep -v "^{" ;;
      pdl) for pdl in 0 1 0 1; do echo "FLASH_LLM_PDL=$pdl"; FLASH_LLM_PDL=$pdl timeout 100 python3 \
             benchmarks/time_across_n.py --fmt tiled-csl --m 4096 --k 14336 --sparsity 0.8 --ns 1,16,32; done 2>&1 | \
             tee "$OUT/pdl.log" ;;
      sdpa) for be in default efficient math; do timeout 100 python3 benchmarks/profile_decode.py --model llama-3-8b \
              --format tiled-csl --sparsity 0.8 --batch 1 --fuse --merge --sdpa $be --out "$OUT/sdpa_$be.json" 2>&1 | \
              grep -v "^ *[0-9]* us\|Warn\|warn"; done 2>&1 | tee "$OUT/sdpa.log" ;;
      e2eopt) timeout ${E2E_TIMEOUT:-400} python3 benchmarks/bench_e2e.py --models opt-30b --no-progress --format ${E2E_FORMAT:-tiled-csl} \
                --sparsities ${E2E_SPARSITIES:-0,80} --batches ${E2E_BATCHES:-1,8,16} --fuse --merge --no-hf --repeats 2 --out "$OUT/e2e_opt" \
                2>&1 | tee "$OUT/e2e_opt.log" | grep -v "^{" ;;
      e2epdl) for pdl in 0 1 0 1; do (export "${PDL_VAR:-FLASH_LLM_PDL}=$pdl"; llama_e2e 150 --format tiled-csl \
                --sparsities 0,80 --batches 1,8 --out "$OUT/e2e_pdl$pdl" 2>&1 | grep "b=" | sed "s/^/${PDL_VAR:-FLASH_LLM_PDL}=$pdl /")
              done 2>&1 | tee "$OUT/e2epdl.log" ;;
      spmm) for dt in ${SPMM_DTYPES:-fp16}; do timeout 200 python3 benchmarks/bench_spmm.py --dtypes $dt --out "$OUT/spmm_$dt" \
              > "$OUT/spmm_$dt.log" 2>&1; tail -40 "$OUT/spmm_$dt.log"; done ;;
      tests) timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q ${TESTS_FILES:-tests/test_kernels_gpu.py tests/test_engine_gpu.py tests/test_decode_attention.py} \
               ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -12 ;;
      attn) timeout 120 python3 -m pytest -q -x tests/test_decode_attention.py 2>&1 | tee "$OUT/attn_tests.log" | tail -3
            { timeout 60 python3 benchmarks/bench_decode_attention.py; timeout 60 python3 benchmarks/bench_decode_attention.py --rope --slots 256; } 2>&1 | tee "$OUT/attn_bench.log"
            for on in 0 1; do FLASH_LLM_DECODE_ATTENTION=$on llama_e2e 200 --format tiled-csl --sparsities ${E2E_SPARSITIES:-0,80} \
              --batches ${E2E_BATCHES:-1,16,64} --out "$OUT/e2e_attn$on" 2>&1 | grep "b=" | sed "s/^/DECODE_ATTENTION=$on /"
            done 2>&1 | tee "$OUT/attn.log" ;;
      attnab) { if two_trees /tmp/attnab "${ATTN_PATCH:?ATTN_PATCH=<file in benchmarks/ab>}"; then
                  for v in ${ATTN_TEST_TREES-patch base}; do echo "--- tests: $v"; (cd /tmp/attnab/$v && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_attn_$v \
                    timeout 120 python3 -m pytest -q -x tests/test_decode_attention.py 2>&1 | tail -2); done
                  for r in 1 2; do for v in base patch; do echo "--- $v, round $r"; (cd /tmp/attnab/$v && PYTHONPATH=$PWD \
                    FLASH_LLM_CACHE=/tmp/flc_attn_$v timeout 90 python3 benchmarks/bench_decode_attention.py --rope \
                    --slots ${ATTN_SLOTS:-256,2048} --batches ${ATTN_BATCHES:-1,16,64}); done; done
                fi; } 2>&1 | tee "$OUT/attnab.log" ;;
      e2eab) { if two_trees /tmp/e2eab "${E2E_PATCH:?E2E_PATCH=<file in benchmarks/ab>}"; then
                 (cd /tmp/e2eab/patch && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_e2e_patch timeout 200 python3 -m pytest -q -x --tb=short \
                   ${E2E_TESTS:-tests/test_kernels_gpu.py tests/test_engine_gpu.py} ${E2E_K:+-k "$E2E_K"} 2>&1 | grep -v "^\.*\s*\[" | tail -40)
                 for r in 1 2; do for v in base patch; do (cd /tmp/e2eab/$v && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_e2e_$v \
                   llama_e2e 150 --format ${E2E_FORMAT:-tiled-csl} --sparsities ${E2E_SPARSITIES:-80} --batches ${E2E_BATCHES:-1,16} \
                   --out "$OUT/e2eab_${v}_r$r" 2>&1 | grep "b=" | sed "s|^|$v r$r |"); done; done
               fi; } 2>&1 | tee "$OUT/e2eab.log" ;;
      e2emulti) { rm -rf /tmp/e2em; i=0  # base and one tree per patch of E2E_PATCHES (each applied alone to the base)
                 for v in base ${E2E_PATCHES:?E2E_PATCHES=<files in benchmarks/ab>}; do copy_tree /tmp/e2em/$i
                   if [ $v != base ]; then (cd /tmp/e2em/$i && git apply "$ROOT/benchmarks/ab/$v" && [ "${E2E_TESTS:-}" != - ] && echo "--- tests: $v" && \
                     PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_e2em_$i timeout 200 python3 -m pytest -q -x --tb=short \
                     ${E2E_TESTS:-tests/test_kernels_gpu.py tests/test_engine_gpu.py} ${E2E_K:+-k "$E2E_K"} 2>&1 | tail -12); fi
                   # every tree's kernels compiled before the timed runs (session 39: the base tree's first run, compiling,
                   # passed E2E_TIMEOUT and lost its last batch), the trees at once (NVRTC is one thread a build)
                   (cd /tmp/e2em/$i && PYTHONPATH=$PWD FLASH_LLM_CACHE=/tmp/flc_e2em_$i timeout 200 python3 -m flash_llm.cli build \
                     > /dev/null 2>&1 || echo "--- flash-llm build failed in tree $i ($v)") &
                   i=$((i + 1)); done; wait
                 for r in $(seq "${E2E_ROUNDS:-1}"); do i=0; for v in base ${E2E_PATCHES}; do (cd /tmp/e2em/$i && PYTHONPATH=$PWD \
                   FLASH_LLM_CACHE=/tmp/flc_e2em_$i llama_e2e ${E2E_TIMEOUT:-150} --format ${E2E_FORMAT:-tiled-csl} --sparsities ${E2E_SPARSITIES:-80} \
                   --batches ${E2E_BATCHES:-1,16} --out "$OUT/e2em_${i}_r$r" 2>&1 | grep "b=" | sed "s|^|$(basename "$v") r$r |")
                   i=$((i + 1)); done; done
               } 2>&1 | tee "$OUT/e2emulti.log" ;;
      drtok) for m in ${DRTOK_MODELS:-llama-3-8b opt-30b}; do (cd benchmarks && timeout 150 python3 dr_parts_tokens.py \
               --model "$m" --sparsity ${DRTOK_SPARSITY:-0.8} --ns ${DRTOK_NS:-2,3} ${DRTOK_ARGS:---atomics --pdl}); done 2>&1 | \
               tee "$OUT/drtok.log" | grep -v "^kind " ;;
      drexpand) timeout 200 python3 benchmarks/dr_expand.py --dtype ${DREXP_DTYPE:-bf16} ${DREXP_KERNELS:+--kernels "$DREXP_KERNELS"} \
                  2>&1 | tee "$OUT/dr_expand.log" ;;
      drmma) [ "${DRMMA_DIAG:-1}" = 1 ] && timeout 300 python3 benchmarks/diag/dr_mma_diag.py 2>&1 | tail -45 | tee "$OUT/dr_mma_diag.log"
             timeout ${DRMMA_TIMEOUT:-300} python3 benchmarks/dr_mma.py --dtype ${DRMMA_DTYPE:-bf16} --ns ${DRMMA_NS:-8,16,32} \
                  --shapes ${DRMMA_SHAPES:-llama,opt} --sparsity ${DRMMA_SP:-0.8} 2>&1 | tee -a "$OUT/dr_mma.log" ;;
      e2eenv) { IFS=';' read -ra envs <<< "${E2E_ENVS:?E2E_ENVS=<settings; settings; ...>};"  # (the ';' keeps a trailing empty one)
                for r in $(seq "${E2E_ROUNDS:-1}"); do i=0; for e in "${envs[@]}"; do i=$((i + 1)); echo "--- round $r: ${e:-defaults}"
                  (for v in $e; do export "$v"; done; llama_e2e ${E2E_TIMEOUT:-200} --format ${E2E_FORMAT:-tiled-csl} --sparsities ${E2E_SPARSITIES:-80} \
                    --batches ${E2E_BATCHES:-1,16} --out "$OUT/e2eenv_${E2E_MODEL:-llama-3-8b}${E2E_TAG:+_$E2E_TAG}_r${r}_$i" 2>&1 | grep "b=\|rror\|already")
                done; done; } 2>&1 | tee "$OUT/e2eenv.log" ;;
      stalls) bash benchmarks/gpu_stalls.sh ${STALLS_SP:-0.8} ${STALLS_NS:-1 16} 2>&1 | tee "$OUT/stalls.log" ;;
      sanitize) bash benchmarks/gpu_sanitize.sh 2>&1 | tail -20 ;;  # CFGS=... picks the runs
      dual) { timeout 200 python3 -m pytest -q --tb=short tests/test_engine_gpu.py -k "dual or delta_layout" 2>&1 | tail -8
              for l in dual auto; do echo "--- delta_layout=$l"; llama_e2e 250 --format delta-rows --sparsities \
                ${E2E_SPARSITIES:-80} --batches ${E2E_BATCHES:-1,2,4,16} --max-batch ${DUAL_MAX:-16} --delta-layout $l \
                --out "$OUT/dual_$l" 2>&1 | grep "b=\|rror"; done; } 2>&1 | tee "$OUT/dual.log" ;;
      cross) { for sp in ${CROSS_SPARSITIES:-0.7 0.8 0.9}; do for v in 1 0; do echo "sparsity $sp, WG32_MIN_DENSITY=$v"
                 FLASH_LLM_TCSL_WG32_MIN_DENSITY=$v timeout 60 python3 benchmarks/time_across_n.py --fmt tiled-csl --m 9216 \
                   --k 36864 --sparsity $sp --ns 17,24,32; done; done
               for v in 1 0; do echo "4096 x 14336, sparsity 0.8, WG32_MIN_DENSITY=$v"; FLASH_LLM_TCSL_WG32_MIN_DENSITY=$v \
                 timeout 60 python3 benchmarks/time_across_n.py --fmt tiled-csl --m 4096 --k 14336 --sparsity 0.8 --ns 17,24,32
               done; } 2>&1 | tee "$OUT/cross.log" ;;
      splits) (cd benchmarks && timeout 300 python3 splits_sweep.py ${SPLITS_ARGS:-}) 2>&1 | tee "$OUT/splits.log" ;;
      *) echo "unknown stage $s (tests ab probe across pdl profile sdpa e2e e2eopt e2epdl spmm stalls sanitize splits attn attnab e2eab e2emulti e2eenv profenv dual cross drtok drexpand drmma)" >&2; exit 2 ;;
    esac
  done
done
# The device tool brings back only a few files of $OUT: unless GPU_AB_KEEP_ALL=1, drop bench_e2e's plots, CSVs and
# summaries (their numbers are in results.json and the logs)
if [ "${GPU_AB_KEEP_ALL:-0}" != 1 ]; then
  find "$OUT" \( -name e2e.png -o -name results.csv -o -name summary.md \) -delete
fi
