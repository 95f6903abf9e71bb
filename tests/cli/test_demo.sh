#!/usr/bin/env bash
# The path of `make demo`: `mamba3 generate` without -m finds the shipped default model (models/default) from the
# executable's location, whatever the working directory, and writes text; MAMBA3_MODEL_DIR overrides the search
# and a wrong one is an error, never a silent fallback. `mamba3 eval` finds the same model.
# Usage: test_demo.sh MAMBA3_BINARY
set -u
bin="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
source "$(dirname "$0")/../support/cli_checks.sh"  # tmp, failures, fail
unset MAMBA3_MODEL_DIR
prompt="The jury said"  # the Makefile's DEMO_PROMPT

# As `make demo` runs it, from an unrelated directory.
out=$(cd "$tmp" && "$bin" generate -p "$prompt" -n 120 --seed 1 2>"$tmp/err"); rc=$?
gen="${out#"$prompt"}"
if [ $rc -ne 0 ]; then fail "generate without -m: rc=$rc: $(cat "$tmp/err")"
elif [ "$gen" = "$out" ]; then fail "output does not start with the prompt: [$out]"
else
  # 120 new bytes of mostly letters and spaces: text, not noise (a random byte model gives ~10% letters).
  letters=$(printf '%s' "$gen" | tr -cd 'A-Za-z ' | wc -c)
  total=$(printf '%s' "$gen" | wc -c)
  if [ "$total" -lt 100 ] || [ $((letters * 100)) -lt $((total * 70)) ]; then
    fail "generated text is too short or not prose ($letters of $total bytes letters/spaces): [$gen]"
  else echo "ok: generate without -m writes text: [$out]"; fi
fi
# Seeded: the same command gives the same text.
again=$(cd "$tmp" && "$bin" generate -p "$prompt" -n 120 --seed 1 2>/dev/null)
[ "$again" = "$out" ] && echo "ok: the demo is repeatable" || fail "same seed, different text: [$out] [$again]"

# MAMBA3_MODEL_DIR wins over the search, and a wrong value is an error.
model_dir="$(dirname "$bin")"
while [ "$model_dir" != / ] && [ ! -f "$model_dir/models/default/config.json" ]; do model_dir=$(dirname "$model_dir"); done
mkdir -p "$tmp/empty"
MAMBA3_MODEL_DIR="$tmp/empty" "$bin" generate -p "$prompt" -n 4 >/dev/null 2>"$tmp/err"; rc=$?
if [ $rc -eq 0 ] || ! grep -q "^error: MAMBA3_MODEL_DIR=.*is not a model directory" "$tmp/err"; then
  fail "a wrong MAMBA3_MODEL_DIR: rc=$rc, stderr: $(cat "$tmp/err")"
else echo "ok: a wrong MAMBA3_MODEL_DIR is an error"; fi
if [ -f "$model_dir/models/default/config.json" ]; then
  cp -r "$model_dir/models/default" "$tmp/copy"
  a=$(MAMBA3_MODEL_DIR="$tmp/copy" "$bin" generate -p "$prompt" -n 16 --seed 3 2>/dev/null)
  b=$("$bin" generate -m "$model_dir/models/default" -p "$prompt" -n 16 --seed 3 2>/dev/null)
  [ -n "$a" ] && [ "$a" = "$b" ] && echo "ok: MAMBA3_MODEL_DIR is used" || fail "MAMBA3_MODEL_DIR: [$a] vs -m: [$b]"
else
  fail "no models/default above $bin"
fi

# eval without -m: the same model, a perplexity far below the 256 of a uniform byte model.
printf 'The jury said that the city election was conducted well, and the mayor thanked the voters.\n' > "$tmp/v.txt"
line=$(cd "$tmp" && "$bin" eval -i v.txt --json 2>"$tmp/err"); rc=$?
ppl=$(printf '%s' "$line" | sed -n 's/.*"perplexity":\([0-9.e+-]*\).*/\1/p')
if [ $rc -ne 0 ] || [ -z "$ppl" ] || ! awk -v p="$ppl" 'BEGIN { exit !(p > 1 && p < 30) }'; then
  fail "eval without -m: rc=$rc [$line] $(cat "$tmp/err")"
else echo "ok: eval without -m: perplexity $ppl per byte"; fi

[ $failures -eq 0 ] && echo "all demo checks passed" || { echo "$failures demo check(s) failed"; exit 1; }
