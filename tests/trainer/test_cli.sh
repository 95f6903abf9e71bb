#!/usr/bin/env bash
# `mamba3 prepare` and `mamba3 train` end to end: prepare writes the documented token file, and every bad input
# (missing/empty data, ids ≥ vocab, a config that cannot build, a non-writable output dir, --device cuda) gives
# `error: …` and a non-zero exit before any training starts. When the build has the language-model gradients, a
# 3-step run writes a checkpoint that `generate` loads, and --resume continues it.
# Usage: test_cli.sh MAMBA3_BINARY
set -u
bin="$1"
source "$(dirname "$0")/../support/cli_checks.sh"  # tmp, failures, fail, expect_error

printf 'hello mamba three, ' > "$tmp/a.txt"
for i in $(seq 1 200); do printf 'the quick brown fox %d jumps over the lazy dog. ' "$i"; done > "$tmp/b.txt"
total=$(( $(stat -c %s "$tmp/a.txt") + $(stat -c %s "$tmp/b.txt") ))

# prepare: header (32 bytes) + 4 bytes per id; bytes tokenizer → one id per byte; the split keeps ⌈10%⌉ apart.
if "$bin" prepare --tokenizer bytes --input "$tmp/a.txt" "$tmp/b.txt" --out "$tmp/tokens.bin" --val-fraction 0.1 2>"$tmp/err"; then
  size=$(stat -c %s "$tmp/tokens.bin")
  [ "$size" = $((32 + 4 * total)) ] && echo "ok: prepare writes header + 4 bytes per id" || fail "token file is $size bytes, want $((32 + 4 * total))"
  [ "$(head -c 8 "$tmp/tokens.bin")" = "M3TOKENS" ] && echo "ok: magic" || fail "no M3TOKENS magic"
  n_val=$(od -An -t u8 -j 24 -N 8 "$tmp/tokens.bin" | tr -d ' ')
  want_val=$(( (total + 9) / 10 ))
  [ "$n_val" = "$want_val" ] && echo "ok: validation split" || fail "n_val=$n_val want $want_val"
  first=$(od -An -t u4 -j 32 -N 4 "$tmp/tokens.bin" | tr -d ' ')
  [ "$first" = 104 ] && echo "ok: first id is 'h'" || fail "first id $first"
else fail "prepare: $(cat "$tmp/err")"; fi
expect_error "prepare: missing input" "cannot open" "$bin" prepare --input "$tmp/nope.txt" --out "$tmp/x.bin"
: > "$tmp/empty.txt"
expect_error "prepare: empty input" "empty" "$bin" prepare --input "$tmp/empty.txt" --out "$tmp/x.bin"
expect_error "prepare: bad val fraction" "validation fraction" "$bin" prepare --input "$tmp/a.txt" --out "$tmp/x.bin" --val-fraction 1.5
expect_error "prepare: missing tokenizer" "nope.json" "$bin" prepare --tokenizer "$tmp/nope.json" --input "$tmp/a.txt" --out "$tmp/x.bin"

cat > "$tmp/config.json" <<'JSON'
{"d_model": 32, "d_intermediate": 64, "n_layer": 2, "vocab_size": 256,
 "ssm_cfg": {"layer": "Mamba3", "d_state": 16, "headdim": 8, "chunk_size": 8}}
JSON
sed 's/"vocab_size": 256/"vocab_size": 100/' "$tmp/config.json" > "$tmp/small_vocab.json"
sed 's/"Mamba3"/"Mamba2"/' "$tmp/config.json" > "$tmp/mamba2.json"
sed 's/"n_layer"/"n_layers_typo": 1, "n_layer"/' "$tmp/config.json" > "$tmp/typo.json"
train=("$bin" train --steps 3 --batch 2 --seq-len 16 --eval-every 2 --save-every 2)

expect_error "train: missing data file" "missing.bin: cannot open" "${train[@]}" --config "$tmp/config.json" --data "$tmp/missing.bin" --out "$tmp/o1"
: > "$tmp/empty.bin"
expect_error "train: empty data file" "empty" "${train[@]}" --config "$tmp/config.json" --data "$tmp/empty.bin" --out "$tmp/o2"
expect_error "train: ids ≥ vocab" "≥ the model's vocab_size 100" "${train[@]}" --config "$tmp/small_vocab.json" --data "$tmp/tokens.bin" --out "$tmp/o3"
expect_error "train: unsupported layer" "ssm_cfg.layer" "${train[@]}" --config "$tmp/mamba2.json" --data "$tmp/tokens.bin" --out "$tmp/o4"
expect_error "train: unknown config field" "n_layers_typo" "${train[@]}" --config "$tmp/typo.json" --data "$tmp/tokens.bin" --out "$tmp/o5"
expect_error "train: non-writable output" "cannot be created" "${train[@]}" --config "$tmp/config.json" --data "$tmp/tokens.bin" --out "$tmp/a.txt/sub"
# --device cuda without a usable GPU (or in a build without the backend) fails before training with a clear error.
if ! nvidia-smi -L >/dev/null 2>&1; then
  expect_error "train: cuda" "\(no usable CUDA device\|no CUDA backend\)" "${train[@]}" --config "$tmp/config.json" \
    --data "$tmp/tokens.bin" --out "$tmp/o6" --device cuda
fi
expect_error "train: GEMM table without cuda" "--gemm-algos .*only with --device cuda" "${train[@]}" --config "$tmp/config.json" \
  --data "$tmp/tokens.bin" --out "$tmp/o9" --gemm-algos "$tmp/algos.json"
expect_error "train: no config" "--config is required" "${train[@]}" --data "$tmp/tokens.bin" --out "$tmp/o7"
expect_error "train: too short" "too few for one window" "$bin" train --steps 3 --batch 2 --seq-len 20000 --config "$tmp/config.json" --data "$tmp/tokens.bin" --out "$tmp/o8"
expect_error "train: resume without checkpoint" "no checkpoint" "${train[@]}" --resume --data "$tmp/tokens.bin" --out "$tmp/o9"
for d in o1 o2 o3 o4 o5 o6 o7 o8; do
  [ -e "$tmp/$d/log.jsonl" ] && fail "$d: a log was started despite the error"
done

# A real run needs the language-model gradients; a build without them says so.
"${train[@]}" --config "$tmp/config.json" --data "$tmp/b.txt" --out "$tmp/run" >/dev/null 2>"$tmp/err"; rc=$?
if grep -q "this build lacks" "$tmp/err"; then
  echo "skip: training run (this build has no language-model gradients)"
elif [ $rc -ne 0 ]; then fail "train run: $(cat "$tmp/err")"
else
  lines=$(wc -l < "$tmp/run/log.jsonl")
  [ "$lines" = 3 ] && echo "ok: log.jsonl has 3 steps" || fail "log.jsonl has $lines lines"
  grep -q '"val_loss"' "$tmp/run/log.jsonl" && echo "ok: validation logged" || fail "no val_loss in the log"
  [ -s "$tmp/run/loss.svg" ] && echo "ok: loss.svg" || fail "no loss.svg"
  out=$("$bin" generate -m "$tmp/run" --ids 104,101 -n 4 --greedy --print-ids --no-stats 2>"$tmp/err") \
    && echo "ok: generate loads the checkpoint" || fail "generate: $(cat "$tmp/err")"
  "$bin" train --resume --steps 5 --data "$tmp/b.txt" --out "$tmp/run" >/dev/null 2>"$tmp/err" \
    && [ "$(wc -l < "$tmp/run/log.jsonl")" = 5 ] && echo "ok: --resume continues to step 5" || fail "resume: $(cat "$tmp/err")"
  # Kill after step 3 (last checkpoint: step 2), resume: the loss sequence equals the uninterrupted run's exactly.
  exact=("$bin" train --config "$tmp/config.json" --data "$tmp/b.txt" --steps 5 --batch 2 --seq-len 16 --eval-every 2 --save-every 2 --seed 3)
  "${exact[@]}" --out "$tmp/whole" >/dev/null 2>&1
  "${exact[@]}" --out "$tmp/cut" --stop-after 3 >/dev/null 2>&1
  "$bin" train --resume --data "$tmp/b.txt" --out "$tmp/cut" >/dev/null 2>"$tmp/err" || fail "resume after kill: $(cat "$tmp/err")"
  losses() { grep -o '"\(loss\|val_loss\|step\)":[^,}]*' "$1/log.jsonl" | tr '\n' ' '; }
  a=$(losses "$tmp/whole"); b=$(losses "$tmp/cut")
  if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "ok: resume after a kill repeats the loss sequence exactly"
  else fail "resumed losses differ: [$a] vs [$b]"; fi
fi

echo "$failures failure(s)"
[ $failures -eq 0 ]
