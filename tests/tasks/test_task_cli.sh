#!/usr/bin/env bash
# `mamba3 task` end to end on CPU (seconds): a short run of each task with each example config writes result.json,
# accuracy.svg, loss.svg and a model that `mamba3 generate` loads; `mamba3 task-plot` combines results; bad input
# (unknown task, --device cuda, missing or unusable config, bad options) gives `error: …` and a non-zero exit.
# Usage: test_task_cli.sh MAMBA3_BINARY CONFIG_DIR
set -u
bin="$1"
configs="$2"
source "$(dirname "$0")/../support/cli_checks.sh"  # tmp, failures, fail, expect_error

small=(--steps 4 --batch 4 --eval-samples 6 --test-lengths 5,9 --threads 1 --log-every 2)
for task in parity mod_arith mod_arith_brackets; do
  for cfg in mamba3 no_rotary euler no_rotary_euler; do
    out="$tmp/$task-$cfg"
    if ! "$bin" task "$task" --model-config "$configs/$cfg.json" "${small[@]}" --out "$out" >"$tmp/stdout" 2>"$tmp/err"; then
      fail "task $task with $cfg: $(cat "$tmp/err")"; continue
    fi
    for f in result.json accuracy.svg loss.svg config.json model.safetensors; do
      [ -s "$out/$f" ] || fail "task $task with $cfg: $f missing"
    done
    grep -q '"task": "'"$task"'"' "$out/result.json" || fail "task $task: result.json does not name the task"
    grep -q '"samples": 6' "$out/result.json" || fail "task $task: result.json lacks the sample count"
    # Printed table: one line per test length (mod_arith rounds 5 and 9 to themselves: both are odd).
    [ "$(grep -cE '^ +(5|9) ' "$tmp/stdout")" = 2 ] || fail "task $task with $cfg: accuracy table: $(cat "$tmp/stdout")"
    "$bin" generate -m "$out" --ids 11,1,0,1 -n 2 --greedy --print-ids --no-stats >/dev/null 2>"$tmp/err" \
      || fail "task $task with $cfg: the saved model does not load: $(cat "$tmp/err")"
  done
  echo "ok: task $task with the four example configs"
done
grep -q '"no_rotary": true' "$tmp/parity-no_rotary/config.json" || fail "the saved no_rotary config lost its switch"
if grep -q 'no_rotary\|euler' "$tmp/parity-mamba3/config.json"; then fail "a default config names the switches"; fi

# Same seed, same result; the result's losses are those of the run.
"$bin" task parity --model-config "$configs/mamba3.json" "${small[@]}" --out "$tmp/again" >/dev/null 2>&1
a=$(grep -A3 '"losses"' "$tmp/parity-mamba3/result.json"); b=$(grep -A3 '"losses"' "$tmp/again/result.json")
[ -n "$a" ] && [ "$a" = "$b" ] && echo "ok: same seed repeats" || fail "same seed differs: [$a] [$b]"

"$bin" task-plot "$tmp"/parity-*/result.json -o "$tmp/parity.svg" 2>"$tmp/err" || fail "task-plot: $(cat "$tmp/err")"
[ "$(grep -c '<polyline' "$tmp/parity.svg" 2>/dev/null)" = 4 ] && echo "ok: task-plot draws 4 series" \
  || fail "task-plot did not draw 4 series"
expect_error "task-plot mixing tasks" "differs" "$bin" task-plot "$tmp/parity-mamba3/result.json" \
  "$tmp/mod_arith-mamba3/result.json" -o "$tmp/mixed.svg"

expect_error "unknown task" "unknown task 'parity3'" "$bin" task parity3 --model-config "$configs/mamba3.json"
if ! nvidia-smi -L >/dev/null 2>&1; then  # without a usable GPU (or the backend): a clear error, no training
  expect_error "device cuda" "\(no usable CUDA device\|no CUDA backend\)" \
    "$bin" task parity --model-config "$configs/mamba3.json" --steps 2 --device cuda
fi
expect_error "device tpu" "--device must be cpu or cuda" \
  "$bin" task parity --model-config "$configs/mamba3.json" --steps 2 --device tpu
expect_error "missing config" "cannot open" "$bin" task parity --model-config "$tmp/none.json" --steps 2
sed 's/"vocab_size": 12/"vocab_size": 10/' "$configs/mamba3.json" >"$tmp/small_vocab.json"
expect_error "vocabulary too small" "vocab_size 10" "$bin" task parity --model-config "$tmp/small_vocab.json" --steps 2
sed 's/"no_rotary": true/"no_rotary": "yes"/' "$configs/no_rotary.json" >"$tmp/bad_switch.json"
expect_error "switch not a boolean" "no_rotary" "$bin" task parity --model-config "$tmp/bad_switch.json" --steps 2
expect_error "bad labels" "final' or 'prefix'" \
  "$bin" task parity --model-config "$configs/mamba3.json" --steps 1 --labels all
"$bin" task mod_arith --model-config "$configs/mamba3.json" "${small[@]}" --labels final --out "$tmp/final" \
  >/dev/null 2>&1 && grep -q '"labels": "final"' "$tmp/final/result.json" && echo "ok: --labels final" \
  || fail "--labels final not honoured"
expect_error "zero steps" "--steps" "$bin" task parity --model-config "$configs/mamba3.json" --steps 0
expect_error "bad test length" "--test-lengths" \
  "$bin" task parity --model-config "$configs/mamba3.json" --steps 1 --test-lengths 0
touch "$tmp/file"
expect_error "output is a file" "not writable\|exists\|directory" \
  "$bin" task parity --model-config "$configs/mamba3.json" --steps 1 --out "$tmp/file"

[ $failures -eq 0 ] && echo "all task CLI checks passed" || echo "$failures task CLI check(s) failed"
exit $((failures > 0))
