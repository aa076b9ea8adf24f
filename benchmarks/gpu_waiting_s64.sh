#!/usr/bin/env bash
# The waiting calls of sessions 63-64 (benchmarks/ab/README.md, top), with a time limit a step:
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh tests                     (about 7 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh expand prefill            (about 7 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh memory lengths            (about 5 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh sanitize                  (about 5 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh dense                     (about 5 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh h100llama                 (5-7 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh h100opt                   (5-7 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh h100spmm                  (about 3 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh kvlen                     (about 6 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh uneven                    (about 3 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh opt66                     (about 6 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh opt175                    (about 8 minutes, an H200)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh encmem                    (about 1 minute)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh fallback                  (about 6 minutes, an H200)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh buildtime                 (about 2 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh fallbacktest              (about 2 minutes, any card)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh switches                  (about 8 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh h100profile               (about 5 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh rows                      (about 5 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh splitrows                 (about 7 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh bands                     (about 4 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh tmma                      (about 10 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh ahead                     (about 6 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh aheadmore                 (about 6 minutes)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh l2warm                    (about 9 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh l2warm16                  (about 9 minutes, an H100)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh l2prof                    (about 5 minutes, any card)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh l2prof80                  (about 6 minutes, any card)
#   FLASH_LLM_COMMIT=<sha> bash benchmarks/gpu_waiting_s64.sh s71tests                  (about 8 minutes, any card)
# tests:   the GPU tests of the new code (the tiled expansion, _nf's new SASS, the prefill graphs, their buckets and
#          Engine.warmup, the tensor-parallel prefill graphs at world size 1, and session 65's decode lengths);
# expand:  the expansion kernels alone (dr_expand.py);
# prefill: the same in the prefill (prefill_ab.py, OPT-30B and Llama-3-8B, nf against nft, and the graph what-if);
# memory:  what the prefill graphs hold (diag/prefill_graph_memory.py);
# lengths: time to first token over varied prompt lengths (ttft_lengths.py, Llama-3-8B at 80 %, with the dense
#          prefill copies as a fourth mode, and dense);
# sanitize: compute-sanitizer memcheck and racecheck over the decoders to dense only (gpu_sanitize.sh), the tiled
#          DeltaRows expansions (_nft, _nftp) among them;
# dense:   Engine(prefill_dense=True): bench_e2e.py's time to first token and peak memory, Llama-3-8B bf16 at 80 %, batch
#          1 and 8, with the dense copies and without (two runs, each with its dense baseline).
# h100llama, h100opt: issue 4's table on the card its targets name (every run since 2026-11-29 was on an H200):
#          bench_e2e.py, bf16, dense / 70 / 80 %, batch 1-64, the Hugging Face baseline, one model a group.  Run them
#          in a device call that names kind nvidia-h100-x1 (a call without a kind mostly gets an H200);
#          docs/engine.md ("On an H100") says what to expect.  h100spmm: issue 3's bench_spmm.py on the same card
#          (both formats, fp16 and bf16).
# kvlen:   decode steps attending the slots in use (session 65, engine.DECODE_KV_BUCKETS): bench_e2e.py with a cache of
#          2048 slots for a 128 + 128 token request, Llama-3-8B bf16 dense and 80 %, batch 1 and 16, with the lengths
#          in buckets and without (FLASH_LLM_DECODE_KV_BUCKETS=0, every step attends all 2048 slots).
# uneven:  a batch of 16 requests wanting 16-256 new tokens each, the batch shrinking as rows stop (session 65,
#          engine.COMPACT_ROWS) and not, interleaved in one process (uneven_rows.py, Llama-3-8B bf16 80 %, dual layout
#          off: the engine's default for max_batch 16).
# opt66:   issue 4's "OPT-66B at 80 % runs on one H100 (dense cannot) and its tokens/s is reported", with today's
#          engine (DeltaRows at batch 1, Tiled-CSL from 4 where the memory holds it): bench_e2e.py bf16, dense (refused:
#          it does not fit) and 80 %, batch 1-32, then 70 % at batch 1.  Name kind nvidia-h100-x1.
# opt175:  issue 4's "OPT-175B at 80 % on one H200": bench_e2e.py bf16 80 %, batch 1, 8, 16 (a call with needs_h200).
# encmem:  the encoders' and decoders' peak device memory on Llama-3-8B's gate / up and OPT-175B's fc1 (session 66's
#          DeltaRows runs of slices), the device's arrays against the CPU's (diag/encode_memory.py).
# fallback: session 66's BitmapTiles where Tiled-CSL does not fit: its GPU test, then OPT-175B at 80 % (DeltaRows
#          model) at batch 16, where the engine should now run BitmapTiles (about 102 ms a token, not 172).
# fallbacktest: fallback's GPU test alone (any card: OPT-175B's run needs an H200).
# switches: the H200-tuned switches A/B'd end to end on an H100 (Llama-3-8B bf16 80 %, DeltaRows, two rounds each,
#          interleaved): batch 1 with the attention's 32-slot chunks (DECODE_ATTN_C32_MIN_BATCH=1) and with the parts
#          kernel's fp32 staging (DELTA_PARTS_STAGE=1); batch 16 with _nt2's split-K summed by atomics (NT_ATOMIC=2).
# h100profile: where a decode step's time goes on the H100, the card of issue 4's targets (profile_decode.py: kernel
#          groups and critical times, the layer timeline): Llama-3-8B bf16 at 80 % (DeltaRows model, the engine's
#          layout for the batch) at batch 1, 8 and 16, dense at 8; for the batch 8-16 gap (1.5-1.65x against 3x).
# rows:    session 68's delta_rows_to_dense_pr (the parts layout expanded a slice a block through its rows in shared
#          memory, FLASH_LLM_DR_DENSE_ROWS): its GPU test (every expansion mode, paired halves added), the expansion
#          kernels alone (dr_expand.py, _nf against _pr) and Llama-3-8B's prefill (prefill_ab.py, nf against pr;
#          OPT-30B's layers are all split layouts at batch 1, so _pr does not run there); then compute-sanitizer's
#          memcheck and racecheck over its test.  If exact and faster, DR_DENSE_ROWS on by default.
# splitrows: session 69's delta_rows_to_dense_sr (the split layout expanded a (slice, split) a block through bands of
#          its window in shared memory, FLASH_LLM_DR_DENSE_SPLIT_ROWS): its GPU test modes (one pass and 64-column
#          passes), dr_expand.py (_nf, _pr, _sr at bands of 1024 / 512 / 2048), OPT-30B's prefill (prefill_ab.py, nf
#          against sr: all its layers are split layouts) and compute-sanitizer over it.  If exact and faster,
#          DR_DENSE_SPLIT_ROWS on by default.
# bands:   session 69's band for _pr (its blocks a band of their rows' columns, FLASH_LLM_DR_DENSE_ROWS_BAND, for more
#          blocks an SM than gate / up's 64 KiB tiles allow): the GPU test modes rows, rows_b64 (and split_rows*, "rows"
#          matches them: _pr's code changed after session 69 timed it), dr_expand.py with _pr whole and at bands of
#          2048 / 1024 and _sr at bands of 512 / 768 / 1024, compute-sanitizer over _pr at 64 columns.  If a band wins
#          on gate / up, set DR_DENSE_ROWS_BAND; if _sr gains at a smaller band, make kernels.dr_dense_sr_band follow.
# tmma:    session 69's delta_rows_spmm_<dtype>_tmma<NT> (the split layout on the tensor cores through _sr's
#          block-parallel placement, FLASH_LLM_DR_MMA_TILE with DR_MMA_MIN): its GPU test (tensor_core_kernel[tile]:
#          every density, 1-32 tokens, bands of 256 columns), dr_mma.py at 8 and 16 tokens (against _mma, the 8-token
#          kernel, its chunks, Tiled-CSL and cuBLAS, at bands of 512 / 1024, with the encoder's splits and with 2 / 4:
#          each split's partials, S x N x M floats, go through memory, which costs the small layers at S = 19-28),
#          compute-sanitizer at 16 tokens.  If
#          it beats Tiled-CSL at 8-16 tokens, an engine could keep DeltaRows from batch 4 (DELTA_TCSL_MIN_BATCH) with it.
# ahead:   session 70's placement with 4 chunks of groups in flight now that they are (kernels.DR_PLACE_AHEAD: _srk4
#          with the default skip, _pr4 on tiles above 32 KiB; the coded steps word's copy no longer waits for each
#          load): the GPU test modes, dr_expand.py (_srk, _srk4, _sr4 / _pr4), OPT-30B's prefill A/B'd in one process
#          (prefill_ab.py --graph, DR_PLACE_AHEAD 1 against 4); aheadmore: Llama-3-8B's, then compute-sanitizer over
#          _srk and _srk4 / _pr4 (decoder modes k, q; the final tree's first sanitizer run).  If 4 wins,
#          DR_PLACE_AHEAD=4 by default.  With them
#          session 70's placement by ranges of groups a warp (DR_PLACE_RANGES: _srw / _prw, one barrier a pass where
#          dr_place has one every 8 groups; never run): its GPU test modes (rows_w, split_rows_w, split_rows_b64_w match
#          "rows"), dr_expand, the prefill A/B's third setting, sanitizer mode w.
#          (Session 71: the tests step also runs the zeroed and nofill modes, _nf / delta_rows_to_dense with the
#          steps word taken at use.)
# l2warm:  session 71's L2 warm-up during the decode attention (kernels.L2_WARM_MB; never run): tests/test_l2_warm.py
#          and the attention's GPU tests (the same bits with it), then Llama-3-8B at 80 %, bf16 DeltaRows, batch 1,
#          bench_e2e.py with 0 / 8 MB asked after the attention's wait and 8 / 20 MB on the side stream (session 72:
#          L2_WARM_SIDE), two rounds in one process each.  If it wins, make the best budget the default (issue 4's 80 % of the floor at batch 1).
# l2prof:  session 71's fix of the warm-up (ranges spread over the blocks first) profiled before it is timed:
#          profile_decode.py, Llama-3-8B bf16 batch 1, dense (l2prof) and 80 % DeltaRows (l2prof80), without, with
#          8 MB inside the attention and 8 MB on a side stream (L2_WARM_SIDE, session 72); is the attention still
#          above 7.4 us a layer with it?
# l2warm16: the same at batches 8 and 16 (Tiled-CSL there: its record rows are the walks), 0 / 8 / 8 MB side.
# s71tests: the GPU tests of session 71's changes, all built without a GPU: the decode attention with the warm-up and
#          its argument checks, _nf's steps word at use (zeroed / nofill modes), spmm_cuda's out checks and large-N
#          dispatch (test_kernels_gpu.py).
# buildtime: OPT-30B's DeltaRows build (80 %, bf16) with the encoder's runs of slices (the default: since session 67
#          as large as an eighth of the free memory allows), with one run a layer (as before session 66) and with
#          session 66's fixed runs (2^22 entries), two rounds each: time and peak memory (diag/build_time.py).
# Each step's log in $OUT/<step>.log, its tail printed; a step that fails or times out does not stop the next.
# NO_BUILD=1 skips the `flash-llm build` that comes first (the kernels then compile at first use).
set -uo pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD FLASH_LLM_CACHE=${FLASH_LLM_CACHE:-/tmp/flc}
step() {  # step <name> <seconds> <command...>
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "(rc $?)" >> "$OUT/$name.log"
  tail -n "${TAIL:-16}" "$OUT/$name.log"
}
[ "${NO_BUILD:-0}" = 1 ] || timeout 300 python3 -m flash_llm.cli build > "$OUT/build.log" 2>&1 || echo "--- flash-llm build failed (see build.log)"
groups=("$@"); [ ${#groups[@]} -gt 0 ] || groups=(tests expand prefill memory lengths sanitize dense)
for group in "${groups[@]}"; do
  case $group in
    tests) step tests_expansion 240 python3 -m pytest -q tests/test_delta_rows_gpu.py -k decode_kernel_is_exact
           step tests_engine 200 python3 -m pytest -q tests/test_engine_gpu.py tests/test_parallel_gpu.py \
             -k "prefill_graphs or prefill_dense or graph_decode_equals_eager or decode_with_graphs or slots_in_use or eos_lag or rows_still_going" ;;
    expand) step dr_expand 120 python3 benchmarks/dr_expand.py \
              --kernels delta_rows_to_dense_nf:1,delta_rows_to_dense_nft:4,delta_rows_to_dense_nftp:4,delta_rows_to_dense_nftp:2 ;;
    prefill) for m in opt-30b llama-3-8b; do
               step "prefill_ab_$m" 150 python3 benchmarks/prefill_ab.py --model "$m" --rounds 4 --graph \
                 --settings "nf:;nft:DR_DENSE_TILED=1;nftp:DR_DENSE_TILED=1,DR_DENSE_T_PF=1"
             done ;;
    memory) step prefill_graph_memory 90 python3 benchmarks/diag/prefill_graph_memory.py ;;
    lengths) for s in 80 0; do
               step "ttft_lengths_$s" 180 python3 benchmarks/ttft_lengths.py --model llama-3-8b --sparsity "$s" \
                 --lengths 64-192 --count 32 $([ "$s" = 0 ] || echo --prefill-dense)
             done ;;
    dense) for pd in "--prefill-dense" ""; do
             step "e2e${pd:+_prefill_dense}" 240 python3 benchmarks/bench_e2e.py --models llama-3-8b --sparsities 0,80 \
               --batches 1,8 --format delta-rows --dtype bf16 --fuse --merge --no-hf --repeats 2 --new 32 --no-progress \
               --out "$OUT/e2e${pd:+_prefill_dense}" $pd
           done ;;
    h100llama|h100opt) m=$([ "$group" = h100llama ] && echo llama-3-8b || echo opt-30b)
             nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/card_$group.txt" 2>&1
             step "e2e_$group" 420 python3 benchmarks/bench_e2e.py --models "$m" --sparsities 0,70,80 \
               --batches 1,8,16,32,64 --format delta-rows --dtype bf16 --fuse --merge --repeats 2 --no-progress \
               --out "$OUT/e2e_$group" ;;
    kvlen) for kvb in 1 0; do
             FLASH_LLM_DECODE_KV_BUCKETS=$kvb step "e2e_kvlen_$kvb" 270 python3 benchmarks/bench_e2e.py --models llama-3-8b \
               --sparsities 0,80 --batches 1,16 --format delta-rows --dtype bf16 --fuse --merge --no-hf --repeats 2 \
               --max-seq 2048 --no-progress --out "$OUT/e2e_kvlen_$kvb"
           done ;;
    uneven) step uneven_rows 240 python3 benchmarks/uneven_rows.py --model llama-3-8b --sparsity 80 --batch 16 \
              --limits 16-256 --rounds 3 --json "$OUT/uneven_rows.json" ;;
    opt66) nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/card_opt66.txt" 2>&1
           step e2e_opt66 330 python3 benchmarks/bench_e2e.py --models opt-66b --sparsities 0,80 --batches 1,8,16,32 \
             --format delta-rows --dtype bf16 --fuse --merge --no-hf --repeats 2 --no-progress --out "$OUT/e2e_opt66"
           step e2e_opt66_70 150 python3 benchmarks/bench_e2e.py --models opt-66b --sparsities 70 --batches 1 \
             --format delta-rows --dtype bf16 --fuse --merge --no-hf --repeats 2 --no-progress --out "$OUT/e2e_opt66_70" ;;
    opt175) nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/card_opt175.txt" 2>&1
            step e2e_opt175 480 python3 benchmarks/bench_e2e.py --models opt-175b --sparsities 80 --batches 1,8,16 \
              --format delta-rows --dtype bf16 --fuse --merge --no-hf --repeats 2 --no-progress --out "$OUT/e2e_opt175" ;;
    fallback) step tests_fallback 240 python3 -m pytest -q tests/test_engine_gpu.py -k "runs_bitmap or delta_layout_follows"
              step e2e_opt175_fallback 420 python3 benchmarks/bench_e2e.py --models opt-175b --sparsities 80 --batches 16 \
                --format delta-rows --dtype bf16 --fuse --merge --no-hf --repeats 2 --no-progress \
                --out "$OUT/e2e_opt175_fallback" ;;
    buildtime) step build_time_runs 150 python3 benchmarks/diag/build_time.py
               FLASH_LLM_ENCODE_CHUNK_ENTRIES=134217728 FLASH_LLM_ENCODE_CHUNK_ELEMENTS=2147483648 \
                 step build_time_whole 150 python3 benchmarks/diag/build_time.py
               FLASH_LLM_ENCODE_CHUNK_ENTRIES=4194304 FLASH_LLM_ENCODE_CHUNK_ELEMENTS=67108864 \
                 step build_time_runs22 150 python3 benchmarks/diag/build_time.py ;;
    rows) step tests_rows 240 python3 -m pytest -q tests/test_delta_rows_gpu.py -k decode_kernel_is_exact
          step dr_expand_rows 150 python3 benchmarks/dr_expand.py --dtype bf16
          step prefill_ab_rows 150 python3 benchmarks/prefill_ab.py --model llama-3-8b --rounds 6 --graph \
            --settings "nf:;pr:DR_DENSE_ROWS=1"
          for tool in memcheck racecheck; do
            step "sanitize_rows_$tool" 240 compute-sanitizer --tool "$tool" --target-processes all python3 -m pytest -q \
              tests/test_delta_rows_gpu.py -k "decode_kernel_is_exact and rows"
          done ;;
    splitrows) step tests_split_rows 300 python3 -m pytest -q tests/test_delta_rows_gpu.py -k "decode_kernel_is_exact and split_rows"
               step dr_expand_sr 150 python3 benchmarks/dr_expand.py --dtype bf16
               step prefill_ab_sr 200 python3 benchmarks/prefill_ab.py --model opt-30b --rounds 4 --graph \
                 --settings "nf:;sr:DR_DENSE_SPLIT_ROWS=1"
               DR_DECODERS=s DR_DECODE_PARTS=1 CFGS="" EPILOGUES="" ATTN=0 DR=0 DR_MMA=0 DECODERS=1 \
                 timeout 150 bash benchmarks/gpu_sanitize.sh > "$OUT/sanitize_sr_run.log" 2>&1
               grep "nofill=s" "$OUT/sanitize.log" ;;
    bands) step tests_bands 300 python3 -m pytest -q tests/test_delta_rows_gpu.py -k "decode_kernel_is_exact and rows"
           step dr_expand_bands 200 python3 benchmarks/dr_expand.py --dtype bf16 --kernels \
             "delta_rows_to_dense_nf:1,delta_rows_to_dense_pr,delta_rows_to_dense_pr:2048,delta_rows_to_dense_pr:1024,delta_rows_to_dense_sr:512,delta_rows_to_dense_sr:768,delta_rows_to_dense_sr"
           DR_DECODERS="b" DR_DECODE_PARTS="4 16" CFGS="" EPILOGUES="" ATTN=0 DR=0 DR_MMA=0 DECODERS=1 \
             timeout 150 bash benchmarks/gpu_sanitize.sh > "$OUT/sanitize_b_run.log" 2>&1
           grep "nofill=b" "$OUT/sanitize.log" ;;
    tmma) step tests_tmma 300 python3 -m pytest -q tests/test_delta_rows_gpu.py -k "tensor_core_kernel and tile"
          step dr_mma_tile 420 python3 benchmarks/dr_mma.py --ns 8,16 --dtype bf16 --tile-bands 512,1024 --tile-splits 2,4
          DR_MMA_ENVS="FLASH_LLM_DR_MMA_TILE=1" CFGS="" EPILOGUES="" ATTN=0 DR=0 DECODERS=0 \
            timeout 150 bash benchmarks/gpu_sanitize.sh > "$OUT/sanitize_tmma_run.log" 2>&1
          grep "mma" "$OUT/sanitize.log" ;;
    ahead) step tests_ahead 240 python3 -m pytest -q tests/test_delta_rows_gpu.py \
             -k "decode_kernel_is_exact and (rows or split_rows or zeroed or nofill)"
           step dr_expand_ahead 150 python3 benchmarks/dr_expand.py --dtype bf16 --kernels \
             "delta_rows_to_dense_srk,delta_rows_to_dense_srk4,delta_rows_to_dense_sr4,delta_rows_to_dense_srw"
           step prefill_ab_ahead_opt-30b 170 python3 benchmarks/prefill_ab.py --model opt-30b --rounds 3 --graph \
             --settings "a1:DR_PLACE_AHEAD=1;a4:DR_PLACE_AHEAD=4;w:DR_PLACE_RANGES=True" ;;
    aheadmore) step prefill_ab_ahead_llama-3-8b 170 python3 benchmarks/prefill_ab.py --model llama-3-8b --rounds 3 \
             --graph --settings "a1:DR_PLACE_AHEAD=1;a4:DR_PLACE_AHEAD=4;w:DR_PLACE_RANGES=True"
           DR_DECODERS="k q w" DR_DECODE_PARTS="1 4" CFGS="" EPILOGUES="" ATTN=0 DR=0 DR_MMA=0 DECODERS=1 \
             timeout 240 bash benchmarks/gpu_sanitize.sh > "$OUT/sanitize_ahead_run.log" 2>&1
           grep -E "nofill=(k|q|w)" "$OUT/sanitize.log" ;;
    s71tests) step tests_attn 140 python3 -m pytest -q tests/test_l2_warm.py tests/test_decode_attention.py \
                tests/test_kernel_args.py
              step tests_nf 100 python3 -m pytest -q tests/test_delta_rows_gpu.py \
                -k "decode_kernel_is_exact and (zeroed or nofill)"
              step tests_kernels 200 python3 -m pytest -q -x tests/test_kernels_gpu.py ;;
    l2prof|l2prof80) [ $group = l2prof ] && sp=0 || sp=0.8
            for sw in "0 0" "8 0" "8 1"; do set -- $sw
              FLASH_LLM_L2_WARM_MB=$1 FLASH_LLM_L2_WARM_SIDE=$2 step "prof_s${sp}_w$1_side$2" 150 python3 \
                benchmarks/profile_decode.py --model llama-3-8b --format delta-rows --sparsity $sp --batch 1 \
                --dtype bf16 --fuse --merge
            done ;;
    l2warm) step tests_l2warm 120 python3 -m pytest -q tests/test_l2_warm.py tests/test_decode_attention.py
            W=FLASH_LLM_L2_WARM_MB S=FLASH_LLM_L2_WARM_SIDE=1; E2E_ENVS=";$W=8;$W=8 $S;$W=20 $S" \
              E2E_FORMAT=delta-rows E2E_SPARSITIES=80 E2E_BATCHES=1 E2E_EXTRA="--dtype bf16" E2E_ROUNDS=2 \
              E2E_TIMEOUT=90 \
              timeout 430 bash benchmarks/gpu_ab_next.sh e2eenv > "$OUT/l2warm_b1.log" 2>&1
            tail -n 16 "$OUT/l2warm_b1.log" ;;
    l2warm16) W=FLASH_LLM_L2_WARM_MB; E2E_ENVS=";$W=8;$W=8 FLASH_LLM_L2_WARM_SIDE=1" E2E_FORMAT=delta-rows \
              E2E_SPARSITIES=80 \
              E2E_BATCHES=8,16 E2E_EXTRA="--dtype bf16" E2E_ROUNDS=2 E2E_TIMEOUT=120 E2E_TAG=b816 \
              timeout 560 bash benchmarks/gpu_ab_next.sh e2eenv > "$OUT/l2warm_b816.log" 2>&1
              tail -n 16 "$OUT/l2warm_b816.log" ;;
    fallbacktest) step tests_fallback 240 python3 -m pytest -q tests/test_engine_gpu.py -k "runs_bitmap or delta_layout_follows" ;;
    switches) E2E_ENVS=";FLASH_LLM_DECODE_ATTN_C32_MIN_BATCH=1;FLASH_LLM_DELTA_PARTS_STAGE=1" E2E_FORMAT=delta-rows \
                E2E_SPARSITIES=80 E2E_BATCHES=1 E2E_EXTRA="--dtype bf16" E2E_ROUNDS=2 E2E_TIMEOUT=120 \
                timeout 330 bash benchmarks/gpu_ab_next.sh e2eenv > "$OUT/switches_b1.log" 2>&1
              tail -n 12 "$OUT/switches_b1.log"
              E2E_ENVS=";FLASH_LLM_NT_ATOMIC=2" E2E_FORMAT=delta-rows E2E_SPARSITIES=80 E2E_BATCHES=16 E2E_TAG=b16 \
                E2E_EXTRA="--dtype bf16" E2E_ROUNDS=2 E2E_TIMEOUT=120 \
                timeout 240 bash benchmarks/gpu_ab_next.sh e2eenv > "$OUT/switches_b16.log" 2>&1
              tail -n 8 "$OUT/switches_b16.log" ;;
    h100profile) for b in 1 8 16; do step "profile_b$b" 150 python3 benchmarks/profile_decode.py --model llama-3-8b \
                   --format delta-rows --sparsity 0.8 --batch $b --dtype bf16 --fuse --merge --out "$OUT/profile_b$b.json"
                 done
                 step profile_dense_b8 150 python3 benchmarks/profile_decode.py --model llama-3-8b --sparsity 0 --batch 8 \
                   --dtype bf16 --fuse --merge --out "$OUT/profile_dense_b8.json" ;;
    encmem) step encode_memory 200 python3 benchmarks/diag/encode_memory.py ;;
    h100spmm) step spmm_h100 300 python3 benchmarks/bench_spmm.py --dtypes fp16,bf16 --out "$OUT/spmm_h100" ;;
    sanitize) echo "=== sanitize"; CFGS="" EPILOGUES="" ATTN=0 DR=0 DR_MMA=0 timeout 420 bash benchmarks/gpu_sanitize.sh \
                > "$OUT/sanitize_run.log" 2>&1; tail -n 24 "$OUT/sanitize.log" ;;
    *) echo "--- unknown step group $group (tests, expand, prefill, memory, lengths, sanitize, dense, h100llama, h100opt, h100spmm, kvlen, uneven, opt66, opt175, encmem, fallback, fallbacktest, switches, h100profile, buildtime, rows, splitrows, bands, tmma, ahead, aheadmore, l2warm, l2warm16, l2prof, l2prof80, s71tests)" ;;
  esac
done
