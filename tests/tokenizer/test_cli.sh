#!/usr/bin/env bash
# `mamba3 tokenize` end to end: encode, decode, special tokens, and errors (exit code and `error:` message).
# Usage: test_cli.sh MAMBA3_BINARY REFS_DIR
set -uo pipefail
bin="$1"; refs="$2"
pass=0; fail=0
check() {  # name expected actual
  if [ "$2" == "$3" ]; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL $1: expected [$2] got [$3]"; fi
}
check "encode cl100k" "[9906,1917]" "$(printf 'Hello world' | "$bin" tokenize -t "$refs/cl100k.tiktoken")"
check "encode gpt2 json" "[15496,995]" "$(printf 'Hello world' | "$bin" tokenize -t "$refs/gpt2.tokenizer.json")"
check "encode llama3 (pattern guessed)" "[9906,1917]" "$(printf 'Hello world' | "$bin" tokenize -t "$refs/llama3.tiktoken")"
check "special as text" "[64,27,91,437,1659,5239,91,29]" "$(printf 'a<|endoftext|>' | "$bin" tokenize -t "$refs/r50k.tiktoken" --pattern gpt2)"
check "special allowed" "[64,50256]" "$(printf 'a<|endoftext|>' | "$bin" tokenize -t "$refs/r50k.tiktoken" --pattern r50k --allow-special)"
check "decode" "Hello world" "$(printf '[9906, 1917]' | "$bin" tokenize -t "$refs/cl100k.tiktoken" --decode)"
text='Ünïcödé 🙂 tabs	and
newlines 12345'
ids="$(printf '%s' "$text" | "$bin" tokenize -t "$refs/o200k.tiktoken")"
check "round trip o200k" "$text" "$(printf '%s' "$ids" | "$bin" tokenize -t "$refs/o200k.tiktoken" --decode)"
check "empty input" "[]" "$(printf '' | "$bin" tokenize -t "$refs/cl100k.tiktoken")"

err="$("$bin" tokenize -t "$refs/does-not-exist.json" </dev/null 2>&1)"; rc=$?
check "missing file exits non-zero" "1" "$rc"
check "missing file message" "error: $refs/does-not-exist.json: cannot open tokenizer file" "$err"
err="$(printf 'x' | "$bin" tokenize -t "$refs/cl100k.tiktoken" --pattern gpt5 2>&1)"; rc=$?
check "unknown pattern exits non-zero" "1" "$rc"
case "$err" in *"unknown split pattern 'gpt5'"*) pass=$((pass + 1)) ;; *) fail=$((fail + 1)); echo "FAIL unknown pattern message: $err" ;; esac
err="$(printf '[1,' | "$bin" tokenize -t "$refs/cl100k.tiktoken" --decode 2>&1)"; rc=$?
check "bad decode input exits non-zero" "1" "$rc"
err="$(printf '[999999]' | "$bin" tokenize -t "$refs/cl100k.tiktoken" --decode 2>&1)"; rc=$?
check "unknown id exits non-zero" "1" "$rc"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
