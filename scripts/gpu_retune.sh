#!/usr/bin/env bash
# On a GPU machine of another kind than the defaults were measured on (they were chosen on an H200): the switches
# whose choice depends on the balance of bandwidth, arithmetic and latency, measured again against the defaults,
# settings alternating in each round. After scripts/gpu_run.sh (or a bundle unpacked into run/). Logs go to $OUT.
#   OUT=… scripts/gpu_retune.sh [train|fused|fusediag|kv|beside|decode|deferred|wide|options|all] [rounds]
# beside: the fused backward core beside the reverse chain, with its state tiles staged, and out_proj beside the
#         forward walk (sixty-sixth session, built without a device; bundle: mamba3 test_mamba3_train_paths_gpu
#         test_lm_train_gpu): the 125M SISO step with each and with all against the defaults, their tests, the
#         training tests with all three, the mixer's parts, memcheck.
# fused:  the GatedMLP's fused products (docs/kernels/fused_gemm.md): tests, per-product times, the step off /
#         cooperative / ping-pong / multicast, the training tests and memcheck with them on.
# fusediag: the fused products' epilogues through shared memory and bulk tensor stores (sixty-third session; first
#         run in the sixty-fourth: plain at cuBLAS's pace, gated slower; bundle: mamba3 bench_fused_gemm
#         test_fused_gemm_gpu test_lm_train_gpu test_train_ops_gpu): per-product times beside the direct stores (all three epilogues; then in_proj, out_proj/fc2 and the lm_head's logits on
#         the plain kernel against cuBLAS), their tests, the step off / cooperative / multicast with them, the step with
#         every bf16-result A·Bᵀ product on the plain kernel (MAMBA3_TRAIN_FUSED_GEMM_PLAIN, sixty-fourth session),
#         memcheck, ncu of the direct-store product. (Sixty-fifth session: ping-pong with shared memory
#         (MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE=pingpong), the gated backward's form apart
#         (MAMBA3_TRAIN_FUSED_GEMM_STORE_BWD=direct); neither gains in the step.)
# train:  the 125M SISO step (`mamba3 bench --train`) with each byte-saving variant that lost by latency on the H200,
#         and the step's parts (MAMBA3_TRAIN_PROFILE=2).
# kv:     the kv chain (MAMBA3_TRAIN_KV_CHAIN; fifty-fifth session) and the walk that adds the forward core's work to
#         it (walk, the default since the fifty-ninth session; 0: the build, chain and forward core): the
#         125M SISO step with the walk against the build + chain + core (then q and 1 once), their bit test, the
#         mixer forward's parts (MAMBA3_TRAIN_PROFILE=2) with and without the walk, and the walk's SASS counters.
# decode: the 1.5B SISO step at batch 128 (scripts/decode_ab.sh) with the product and launch settings kept off on the
#         H200.
# deferred: the deferred state writes' tests, the 1.5B SISO steps (b1/b16/b128) with the automatic interval (every 4
#         steps from 128 rows, every 2 below) against every 2, 1 and 4 steps, MIMO R = 4 b128 deferred (default, W = 2)
#         against every-step writes, and the MIMO step's kernels (ncu, scripts/gpu_profile.sh) at both.
# wide:   the stream GEMM's wide form (65–128 rows, opt-in: MAMBA3_STREAM_GEMM=all) against cuBLAS: the 1.5B products
#         at 96 and 128 rows (default split, then forced splits), and the SISO and MIMO steps at batch 96 and 128
#         (with the norms folded into the products, the default there, and without; and with the Mamba-3 kernels
#         under PDL at those rows, so that they too start under the product before them); and the steps at b8–b64
#         with the narrow forms through the fragment epilogue (MAMBA3_STREAM_GEMM_EPILOGUE=fragments, the earlier one).
# options: the wide class's remaining A/B options (docs/kernels/stream_gemm.md): the 1.5B products at 128 rows with
#         64-row tiles and with wgmma depth, then the SISO and MIMO steps at batch 128 with them (measured in the
#         fortieth session: both lose or tie; x multicast, which lost everywhere, was removed in the forty-second).
#         The diagnostic build that separates the weight stream, x and the tensor work:
#         scripts/stream_gemm_diag_patch.py; the block timeline: scripts/stream_gemm_timeline_patch.py.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
rounds=${2:-2}
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/run/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export MAMBA3_BIN=${MAMBA3_BIN:-run/bin/mamba3}
[[ -x $MAMBA3_BIN ]] || { echo "gpu_retune.sh: $MAMBA3_BIN is not an executable (unpack a bundle first)" >&2; exit 2; }
train_row() {  # $1: label; the rest: VAR=value assignments
  local label=$1; shift
  local row
  row=$(env "$@" timeout 120 "$MAMBA3_BIN" bench --device cuda --train --preset 125m 2>&1 | grep -E 'Mamba-3|rror')
  printf '%-10s %s\n' "$label" "$row" | tee -a "$OUT/retune_train.txt"
}
if [[ $what == train || $what == all ]]; then
  for ((r = 1; r <= rounds; ++r)); do
    train_row defaults
    train_row unrotate MAMBA3_TRAIN_CORE_UNROTATE=1
    train_row heads MAMBA3_TRAIN_CORE_UNROTATE=heads
    train_row totals-r MAMBA3_TRAIN_ROTATION_TOTALS=1
    train_row no-pdl MAMBA3_TRAIN_PDL=0
  done
  MAMBA3_TRAIN_PROFILE=2 timeout 120 "$MAMBA3_BIN" bench --device cuda --train --preset 125m \
    > "$OUT/retune_train_profile.txt" 2>&1
  tail -40 "$OUT/retune_train_profile.txt"
fi
if [[ $what == fused || $what == all ]]; then
  # The fused GatedMLP products (opt-in; correct and slower than cuBLAS on the sixty-first session's H100): their
  # tests first (a hang shows as the timeout), their per-product times against cuBLAS + the activation kernels, then the step off / on and the
  # whole-model training tests and memcheck with them on. Needs test_fused_gemm_gpu, bench_fused_gemm and
  # test_lm_train_gpu in the bundle.
  bin=$(dirname "$MAMBA3_BIN")
  MAMBA3_TRAIN_FUSED_GEMM=1 timeout 60 "$bin/test_fused_gemm_gpu" > "$OUT/fused_tests.txt" 2>&1
  echo "test_fused_gemm_gpu rc=$?"; grep -E "FAILED|Failure|Expected|Which is|OK \]" "$OUT/fused_tests.txt" | head -30
  timeout 60 "$bin/bench_fused_gemm" 2>&1 | tee "$OUT/fused_bench.txt" | tail -14
  for ((r = 1; r <= rounds; ++r)); do
    train_row fused-off MAMBA3_TRAIN_FUSED_GEMM=0
    train_row fused-coop MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE=cooperative
    train_row fused-ping MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE=pingpong
    train_row fused-mc MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE=multicast
  done
  MAMBA3_TRAIN_FUSED_GEMM=1 timeout 240 "$bin/test_lm_train_gpu" > "$OUT/fused_lm.txt" 2>&1
  echo "test_lm_train_gpu (fused) rc=$?"
  MAMBA3_TRAIN_FUSED_GEMM=1 timeout 180 compute-sanitizer --tool memcheck "$bin/test_fused_gemm_gpu" \
    > "$OUT/fused_memcheck.txt" 2>&1
  echo "memcheck rc=$? $(grep 'ERROR SUMMARY' "$OUT/fused_memcheck.txt")"
fi
if [[ $what == fusediag ]]; then
  # (a device call cut short still returns what is written first: the per-product times)
  # The sixty-third session found the direct-store epilogue costing ≈ 80 µs of fc1's 173 (the mainloop with its
  # products, nothing stored: 92.9); these are the shared-memory + bulk-store epilogues' questions.
  bin=$(dirname "$MAMBA3_BIN")
  timeout 90 "$bin/bench_fused_gemm" 2>&1 | tee "$OUT/fusediag_bench.txt" | tail -40
  MAMBA3_TRAIN_FUSED_GEMM_STORE=tma timeout 90 "$bin/bench_fused_gemm" 2>&1 | tee "$OUT/fusediag_bench_tma.txt" |
    grep -E "fused|rror"
  MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_STORE=tma timeout 60 "$bin/test_fused_gemm_gpu" \
    > "$OUT/fusediag_tests.txt" 2>&1
  echo "test_fused_gemm_gpu (tma) rc=$?"; grep -E "FAILED|Failure|Expected|Which is" "$OUT/fusediag_tests.txt" | head
  for ((r = 1; r <= rounds; ++r)); do
    train_row fused-off MAMBA3_TRAIN_FUSED_GEMM=0
    train_row fused-coop-tma MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_STORE=tma
    train_row fused-mc-tma MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_STORE=tma \
      MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE=multicast
    train_row plain-tma MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1 MAMBA3_TRAIN_FUSED_GEMM_STORE=tma
    train_row all-tma MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1 MAMBA3_TRAIN_FUSED_GEMM_STORE=tma
  done
  MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1 MAMBA3_TRAIN_FUSED_GEMM_STORE=tma timeout 120 "$bin/test_train_ops_gpu" \
    --gtest_filter='*Bf16Output*:*LmHead*' > "$OUT/fusediag_plain_ops.txt" 2>&1
  echo "test_train_ops_gpu (plain kernel, tma) rc=$?"; tail -1 "$OUT/fusediag_plain_ops.txt"
  MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1 MAMBA3_TRAIN_FUSED_GEMM_STORE=tma timeout 240 \
    "$bin/test_lm_train_gpu" > "$OUT/fusediag_lm.txt" 2>&1
  echo "test_lm_train_gpu (fused and plain kernels, tma) rc=$?"
  MAMBA3_TRAIN_FUSED_GEMM=1 MAMBA3_TRAIN_FUSED_GEMM_STORE=tma timeout 180 compute-sanitizer --tool memcheck \
    "$bin/test_fused_gemm_gpu" > "$OUT/fusediag_memcheck.txt" 2>&1
  echo "memcheck rc=$? $(grep 'ERROR SUMMARY' "$OUT/fusediag_memcheck.txt")"
  # The cooperative plain product with direct stores: where its warps wait.
  timeout 120 ncu -k "regex:fused_gemm_kernel<0, 0, 0, 0>" --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats "$bin/bench_fused_gemm" \
    > "$OUT/fusediag_ncu.txt" 2>&1
  echo "ncu (plain, direct stores) rc=$?"
  grep -hE "Duration|Throughput|Stall|L2 Hit|Issued" "$OUT"/fusediag_ncu.txt | head -24
fi
if [[ $what == kv || $what == all ]]; then
  # (the steps first, the walk beside the defaults: a device call cut short still says whether it is worth testing)
  # (the walk is the candidate since the fifty-eighth session: it alternates with the defaults; the kv chain's other
  # forms once, after)
  for ((r = 1; r <= rounds; ++r)); do
    train_row kv-off MAMBA3_TRAIN_KV_CHAIN=0
    train_row kv-walk MAMBA3_TRAIN_KV_CHAIN=walk
  done
  train_row kv-q MAMBA3_TRAIN_KV_CHAIN=q
  train_row kv-1 MAMBA3_TRAIN_KV_CHAIN=1
  # (the bit test, naming the forward buffer a form changed)
  [[ -x run/bin/test_mamba3_train_paths_gpu ]] &&
    timeout 150 run/bin/test_mamba3_train_paths_gpu --gtest_filter='*KvChain*' > "$OUT/retune_kv_test.txt" 2>&1
  grep -E 'changed bits|differs first|did not run|FAILED|PASSED' "$OUT/retune_kv_test.txt" | head -20 |
    tee -a "$OUT/retune_train.txt"
  for m in 0 walk; do
    MAMBA3_TRAIN_KV_CHAIN=$m MAMBA3_TRAIN_PROFILE=2 timeout 120 "$MAMBA3_BIN" bench --device cuda --train \
      --preset 125m --steps 2 > "$OUT/retune_kv_profile_$m.txt" 2>&1
    echo "kv=$m $(grep 'mixer forward' "$OUT/retune_kv_profile_$m.txt" | tail -1)" | tee -a "$OUT/retune_train.txt"
  done
  # (the walk's SASS source counters: per-instruction stall samples and executed counts, as the fifty-eighth session
  # read them per segment between block barriers)
  MAMBA3_TRAIN_KV_CHAIN=walk timeout 150 ncu -k regex:fwd_walk -c 1 --section SourceCounters --section WarpStateStats \
    --section SpeedOfLight -o "$OUT/retune_kv_walk" "$MAMBA3_BIN" bench --device cuda --train --preset 125m \
    --steps 1 > "$OUT/retune_kv_ncu.txt" 2>&1 &&
    timeout 100 ncu -i "$OUT/retune_kv_walk.ncu-rep" --page source --print-source sass --csv \
      > "$OUT/retune_kv_walk_sass.csv" 2>&1 && xz "$OUT/retune_kv_walk_sass.csv"
fi
if [[ $what == beside || $what == all ]]; then
  # (the steps first, alternating: a device call cut short still says whether either is worth testing)
  for ((r = 1; r <= rounds; ++r)); do
    train_row defaults
    train_row beside MAMBA3_TRAIN_CORE_BESIDE=1
    train_row staged MAMBA3_TRAIN_CORE_STAGED=1
    train_row both MAMBA3_TRAIN_CORE_BESIDE=1 MAMBA3_TRAIN_CORE_STAGED=1
    train_row outproj MAMBA3_TRAIN_OUT_PROJ_BESIDE=1
    train_row all3 MAMBA3_TRAIN_CORE_BESIDE=1 MAMBA3_TRAIN_CORE_STAGED=1 MAMBA3_TRAIN_OUT_PROJ_BESIDE=1
  done
  [[ -x run/bin/test_mamba3_train_paths_gpu ]] &&
    timeout 200 run/bin/test_mamba3_train_paths_gpu --gtest_filter='*Beside*' > "$OUT/retune_beside_test.txt" 2>&1
  grep -E 'other bits|did not run|Expected|FAILED|PASSED' "$OUT/retune_beside_test.txt" | head -20 |
    tee -a "$OUT/retune_train.txt"
  [[ -x run/bin/test_lm_train_gpu ]] && MAMBA3_TRAIN_CORE_BESIDE=1 MAMBA3_TRAIN_CORE_STAGED=1 \
    MAMBA3_TRAIN_OUT_PROJ_BESIDE=1 timeout 150 run/bin/test_lm_train_gpu > "$OUT/retune_beside_lm.txt" 2>&1
  tail -1 "$OUT/retune_beside_lm.txt" | sed 's/^/lm train tests, all three on: /' | tee -a "$OUT/retune_train.txt"
  # (the mixer's parts: beside, the chain and the core are one mark, and the walk and out_proj)
  for m in "A=1" "MAMBA3_TRAIN_CORE_STAGED=1"; do
    env $m MAMBA3_TRAIN_PROFILE=2 timeout 120 "$MAMBA3_BIN" bench --device cuda --train --preset 125m --steps 2 \
      > "$OUT/retune_beside_profile.txt" 2>&1
    echo "$m $(grep -E 'mixer backward' "$OUT/retune_beside_profile.txt" | tail -1)" | tee -a "$OUT/retune_train.txt"
    echo "$m $(grep -E 'mixer forward' "$OUT/retune_beside_profile.txt" | tail -1)" | tee -a "$OUT/retune_train.txt"
  done
  timeout 200 compute-sanitizer --tool memcheck run/bin/test_mamba3_train_paths_gpu --gtest_filter='*Beside*' \
    2>&1 | tail -3 | tee -a "$OUT/retune_train.txt"
fi
if [[ $what == decode || $what == all ]]; then
  timeout 400 scripts/decode_ab.sh -p 1.5b -b 128 -r "$rounds" -- "" "MAMBA3_GEMM_TUNE=1" \
    "MAMBA3_PDL_MAX_ROWS=128" "MAMBA3_DECODE_PREFETCH=product" "MAMBA3_DECODE_PREFETCH=kernel" \
    2>&1 | tee "$OUT/retune_decode.txt"
fi
if [[ $what == deferred || $what == all ]]; then
  # Deferred state writes (docs/kernels/mamba3_cuda.md): their tests, then SISO with the automatic interval against
  # every 2, every step and every 4, at batch 1, 16 and 128, and MIMO deferred (the default) against every step. Note
  # that MAMBA3_DECODE_STATE_WRITES applies to MIMO layers too.
  for bin in test_mamba3_gpu test_model_gpu; do
    [[ -x run/bin/$bin ]] && timeout 120 run/bin/$bin --gtest_filter=*Deferred* --gtest_brief=1 2>&1 |
      tail -5 | tee -a "$OUT/retune_deferred.txt"
  done
  timeout 300 scripts/decode_ab.sh -p 1.5b -b "1 16 128" -r "$rounds" -- "" "MAMBA3_DECODE_STATE_WRITES=2" \
    "MAMBA3_DECODE_STATE_WRITES=1" "MAMBA3_DECODE_STATE_WRITES=4" 2>&1 | tee -a "$OUT/retune_deferred.txt"
  timeout 200 scripts/decode_ab.sh -p 1.5b-mimo -b 128 -r "$rounds" -- "" "MAMBA3_DECODE_DEFER_MIMO=0" \
    2>&1 | tee -a "$OUT/retune_deferred.txt"
  # Why MIMO gains little from fewer state bytes: its step's kernels, deferred and every step.
  for setting in "" "MAMBA3_DECODE_DEFER_MIMO=0"; do
    echo "== MIMO b128 kernels, ${setting:-defaults}" >> "$OUT/retune_deferred_profile.txt"
    env $setting timeout 240 scripts/gpu_profile.sh decode 1.5b-mimo 128 >> "$OUT/retune_deferred_profile.txt" 2>&1
  done
fi
if [[ $what == options || $what == all ]]; then
  for setting in "" "MAMBA3_STREAM_GEMM_WGMMA_DEPTH=1" "MAMBA3_STREAM_GEMM_WIDE_TILE=64"; do
    echo "== products, ${setting:-defaults}" | tee -a "$OUT/retune_options.txt"
    env MAMBA3_STREAM_GEMM=all $setting timeout 60 "$MAMBA3_BIN" bench --device cuda --products --preset 1.5b \
      --batch 128 2>&1 | grep -E "^  [a-z]|grid|rror" | tee -a "$OUT/retune_options.txt"
  done
  for preset in 1.5b 1.5b-mimo; do
    timeout 300 scripts/decode_ab.sh -p "$preset" -b "128" -r "$rounds" -- "" "MAMBA3_STREAM_GEMM=all" \
      "MAMBA3_STREAM_GEMM=all MAMBA3_STREAM_GEMM_WGMMA_DEPTH=1" "MAMBA3_STREAM_GEMM=all MAMBA3_STREAM_GEMM_WIDE_TILE=64" \
      2>&1 | tee -a "$OUT/retune_options.txt"
  done
fi
if [[ $what == wide || $what == all ]]; then
  for split in "" 1 2 4 8; do
    echo "== products, MAMBA3_STREAM_GEMM_SPLIT=${split:-default}" | tee -a "$OUT/retune_wide.txt"
    env ${split:+MAMBA3_STREAM_GEMM_SPLIT=$split} timeout 120 "$MAMBA3_BIN" bench --device cuda --products \
      --preset 1.5b --batch 96 128 2>&1 | tee -a "$OUT/retune_wide.txt"
  done
  # The narrow forms (8–64 rows) through the fragment epilogue (the default: the row epilogue).
  timeout 200 scripts/decode_ab.sh -p 1.5b -b "8 16 32 64" -r "$rounds" -- "" "MAMBA3_STREAM_GEMM_EPILOGUE=fragments" \
    2>&1 | tee -a "$OUT/retune_wide.txt"
  for preset in 1.5b 1.5b-mimo; do
    timeout 300 scripts/decode_ab.sh -p "$preset" -b "96 128" -r "$rounds" -- "" "MAMBA3_STREAM_GEMM=all" \
      "MAMBA3_STREAM_GEMM=all MAMBA3_DECODE_NORM_FOLD=0" "MAMBA3_STREAM_GEMM=all MAMBA3_PDL_MAX_ROWS=128" \
      2>&1 | tee -a "$OUT/retune_wide.txt"
  done
fi
