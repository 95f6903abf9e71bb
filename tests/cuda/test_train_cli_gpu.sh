#!/usr/bin/env bash
# `mamba3 train --device cuda` and `mamba3 task --device cuda` end to end on a GPU (label cuda): a short run writes a
# checkpoint that `generate` loads; a run killed after step 4 (checkpoint at 3) and resumed logs exactly the losses of
# the uninterrupted run; the f32 GPU run follows the CPU run's losses; a task run trains on the GPU and evaluates.
# Without a usable GPU it reports itself skipped (ctest SKIP_RETURN_CODE 77), never passed.
# Usage: test_train_cli_gpu.sh MAMBA3_BINARY
set -u
bin="$1"
nvidia-smi -L >/dev/null 2>&1 || { echo "[  SKIPPED ] no CUDA device"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
losses() { grep -o '"loss":[^,}]*' "$1/log.jsonl" | cut -d: -f2; }

for i in $(seq 1 300); do printf 'the quick brown fox %d jumps over the lazy dog. ' "$i"; done > "$tmp/text.txt"
"$bin" prepare --input "$tmp/text.txt" --out "$tmp/tokens.bin" --val-fraction 0.1 >/dev/null 2>&1 || fail "prepare"
cat > "$tmp/config.json" <<'JSON'
{"d_model": 32, "d_intermediate": 64, "n_layer": 2, "vocab_size": 256,
 "ssm_cfg": {"layer": "Mamba3", "d_state": 16, "headdim": 8, "chunk_size": 8}}
JSON
train=("$bin" train --config "$tmp/config.json" --data "$tmp/tokens.bin" --steps 6 --batch 3 --seq-len 40
       --eval-every 3 --save-every 3 --lr 3e-3 --warmup 1)

"${train[@]}" --out "$tmp/gpu" --device cuda --precision f32 2>"$tmp/err" || fail "gpu run: $(tail -3 "$tmp/err")"
"$bin" generate -m "$tmp/gpu" --ids 104,101 -n 4 >/dev/null 2>&1 && echo "ok: generate loads the GPU checkpoint" \
  || fail "generate cannot load the GPU checkpoint"
"${train[@]}" --out "$tmp/cpu" --device cpu 2>/dev/null || fail "cpu run"
paste <(losses "$tmp/gpu") <(losses "$tmp/cpu") | awk '{d = $1 - $2; if (d < 0) d = -d; if (d > 1e-4 * $2) bad = 1}
  END {exit bad}' && echo "ok: GPU f32 losses follow the CPU" || fail "GPU losses differ from the CPU: $(paste <(losses "$tmp/gpu") <(losses "$tmp/cpu") | tr '\n' ' ')"

"${train[@]}" --out "$tmp/killed" --device cuda --precision bf16 >/dev/null 2>&1
"${train[@]}" --out "$tmp/resumed" --device cuda --precision bf16 --stop-after 4 >/dev/null 2>&1
"$bin" train --resume --out "$tmp/resumed" --data "$tmp/tokens.bin" --device cuda --precision bf16 >/dev/null 2>&1 \
  || fail "resume"
[ "$(losses "$tmp/killed")" = "$(losses "$tmp/resumed")" ] && echo "ok: GPU resume reproduces the uninterrupted losses" \
  || fail "resumed losses differ: $(losses "$tmp/resumed" | tr '\n' ' ') vs $(losses "$tmp/killed" | tr '\n' ' ')"

# A tuned GEMM table (bench --tune-gemm) taken by train --gemm-algos: two runs with it log the same losses; a missing
# table stops the run before training.
"$bin" bench --device cuda --train --config "$tmp/config.json" --train-batch 3 --seq-len 40 --steps 1 \
  --tune-gemm "$tmp/algos.json" >/dev/null 2>"$tmp/err" || fail "bench --tune-gemm: $(tail -3 "$tmp/err")"
grep -q '"format": "mamba3-train-gemm-algos"' "$tmp/algos.json" 2>/dev/null && echo "ok: --tune-gemm writes the table" \
  || fail "no GEMM table written"
"${train[@]}" --out "$tmp/tuned1" --device cuda --gemm-algos "$tmp/algos.json" >/dev/null 2>&1 || fail "train --gemm-algos"
"${train[@]}" --out "$tmp/tuned2" --device cuda --gemm-algos "$tmp/algos.json" >/dev/null 2>&1 || fail "train --gemm-algos"
[ -n "$(losses "$tmp/tuned1")" ] && [ "$(losses "$tmp/tuned1")" = "$(losses "$tmp/tuned2")" ] \
  && echo "ok: runs with the GEMM table repeat their losses" || fail "runs with the GEMM table differ"
"${train[@]}" --out "$tmp/tuned3" --device cuda --gemm-algos "$tmp/missing.json" >/dev/null 2>"$tmp/err" \
  && fail "a missing GEMM table was accepted" || { grep -q "missing.json" "$tmp/err" \
  && echo "ok: a missing GEMM table is named" || fail "missing table error: $(cat "$tmp/err")"; }

configs="$(dirname "$0")/../../configs/tasks/parity"
"$bin" task parity --model-config "$configs/mamba3.json" --steps 20 --batch 8 --eval-samples 8 --test-lengths 5,9 \
  --device cuda --threads 1 --out "$tmp/task" >/dev/null 2>"$tmp/err" && [ -f "$tmp/task/result.json" ] \
  && grep -q '"device": *"cuda"' "$tmp/task/result.json" && echo "ok: task trains on the GPU" \
  || fail "task --device cuda: $(tail -3 "$tmp/err")"

[ $failures -eq 0 ] && echo "all GPU CLI checks passed" || echo "$failures GPU CLI check(s) failed"
[ $failures -eq 0 ]
