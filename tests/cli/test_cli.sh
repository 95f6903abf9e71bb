#!/usr/bin/env bash
# The `mamba3` CLI end to end: a golden model generates its known greedy continuation, seeded sampling repeats,
# and bad input of every kind gives `error: …` naming the problem and a non-zero exit (never a crash).
# Usage: test_cli.sh MAMBA3_BINARY
set -u
bin="$1"
golden="${MAMBA3_GOLDEN_DIR:-${MAMBA3_GOLDEN_DIR_DEFAULT:-$(dirname "$0")/../../../shared/golden}}"
model="$golden/lm_siso_mlp"
[ -d "$model" ] || { echo "FAIL: golden model $model not found (set MAMBA3_GOLDEN_DIR)"; exit 1; }
source "$(dirname "$0")/../support/cli_checks.sh"  # tmp, failures, fail, expect_error
prompt=248,146,298,48,217,52,210,19,5,213,100,22,229,231,24,262,63,65,149,39,101,81,232

expect_ok() {  # name, expected stdout, command…
  local name="$1" want="$2"; shift 2
  local out; out=$("$@" 2>"$tmp/err"); local rc=$?
  if [ $rc -ne 0 ] || [ "$out" != "$want" ]; then
    echo "FAIL: $name: rc=$rc stdout=[$out] want [$want]; stderr: $(cat "$tmp/err")"; failures=$((failures + 1))
  else echo "ok: $name"; fi
}

expect_ok "greedy continuation equals the golden one" "[0, 23, 75, 9, 120, 229]" \
  "$bin" generate -m "$model" --ids "$prompt" -n 6 --greedy --print-ids --no-stats
a=$("$bin" generate -m "$model" --ids 1,2,3 -n 12 --seed 5 --temperature 1 --top-k 0 --top-p 1 --min-p 0 --print-ids --no-stats 2>/dev/null)
b=$("$bin" generate -m "$model" --ids 1,2,3 -n 12 --seed 5 --temperature 1 --top-k 0 --top-p 1 --min-p 0 --print-ids --no-stats 2>/dev/null)
c=$("$bin" generate -m "$model" --ids 1,2,3 -n 12 --seed 6 --temperature 1 --top-k 0 --top-p 1 --min-p 0 --print-ids --no-stats 2>/dev/null)
if [ -n "$a" ] && [ "$a" = "$b" ] && [ "$a" != "$c" ]; then echo "ok: same seed repeats, other seed differs"
else echo "FAIL: seeded sampling: [$a] [$b] [$c]"; failures=$((failures + 1)); fi
lines=$("$bin" generate -m "$model" --ids 1,2,3 -n 4 --batch 3 --print-ids --no-stats 2>/dev/null | wc -l)
[ "$lines" = 3 ] && echo "ok: --batch 3 gives 3 sequences" || { echo "FAIL: --batch 3 gave $lines lines"; failures=$((failures + 1)); }

expect_error "bf16 state on the CPU" "only --device cuda stores a bf16 state" \
  "$bin" generate -m "$model" --ids 1 --state-precision bf16
expect_error "unknown state precision" "'f16' is not one of f32, bf16" \
  "$bin" generate -m "$model" --ids 1 --state-precision f16
expect_error "serve: bf16 state on the CPU" "only the CUDA backend stores a bf16 state" \
  timeout 20 "$bin" serve -m "$model" --device cpu --port 0 --state-precision bf16
expect_error "missing model dir" "not a model directory" "$bin" generate -m "$tmp/nope" --ids 1
mkdir -p "$tmp/empty"
expect_error "missing config.json" "config.json: cannot open" "$bin" generate -m "$tmp/empty" --ids 1
mkdir -p "$tmp/noweights" && cp "$model/config.json" "$tmp/noweights/"
expect_error "missing weights" "noweights" "$bin" generate -m "$tmp/noweights" --ids 1
mkdir -p "$tmp/trunc" && cp "$model/config.json" "$tmp/trunc/"
head -c 100000 "$model/model.safetensors" > "$tmp/trunc/model.safetensors"
expect_error "truncated weights" "model.safetensors" "$bin" generate -m "$tmp/trunc" --ids 1
mkdir -p "$tmp/shape" && cp "$model/model.safetensors" "$tmp/shape/"
sed 's/"d_intermediate": 96/"d_intermediate": 300/' "$model/config.json" > "$tmp/shape/config.json"
expect_error "config/weight shape mismatch" "expected shape" "$bin" generate -m "$tmp/shape" --ids 1
mkdir -p "$tmp/unknown" && cp "$model/model.safetensors" "$tmp/unknown/"
sed 's/"n_layer"/"n_layers_typo": 1, "n_layer"/' "$model/config.json" > "$tmp/unknown/config.json"
expect_error "unknown config field" "unknown field 'n_layers_typo'" "$bin" generate -m "$tmp/unknown" --ids 1
mkdir -p "$tmp/mamba2" && cp "$model/model.safetensors" "$tmp/mamba2/"
sed 's/"Mamba3"/"Mamba2"/' "$model/config.json" > "$tmp/mamba2/config.json"
expect_error "unsupported layer kind" "ssm_cfg.layer" "$bin" generate -m "$tmp/mamba2" --ids 1
expect_error "token id past the vocabulary" "outside the vocabulary" "$bin" generate -m "$model" --ids 1,300
expect_error "negative token id" "outside the vocabulary" "$bin" generate -m "$model" --ids -4
expect_error "malformed ids" "--ids: 'x' is not an integer" "$bin" generate -m "$model" --ids 1,x
expect_error "empty prompt" "prompt is empty" "$bin" generate -m "$model" -p ""
expect_error "top_p out of range" "top_p" "$bin" generate -m "$model" --ids 1 --top-p 2
expect_error "negative temperature" "temperature" "$bin" generate -m "$model" --ids 1 --temperature -1
expect_error "repetition penalty zero" "repetition_penalty" "$bin" generate -m "$model" --ids 1 --repeat-penalty 0
expect_error "batch zero" "--batch" "$bin" generate -m "$model" --ids 1 --batch 0
expect_error "info on a missing path" "cannot open" "$bin" info "$tmp/missing.safetensors"

# OpenBLAS's kernels: on an AVX2 CPU the process must end up with AVX2-class kernels even where OpenBLAS's own
# detection falls back to old ones (ops/blas_kernels.h re-executes with OPENBLAS_CORETYPE); a user's choice stands.
if grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo; then
  core=$(OPENBLAS_VERBOSE=2 "$bin" --help 2>&1 >/dev/null | sed -n 's/^Core: //p' | tail -n 1)
  case "$core" in
    "") echo "skip: OpenBLAS reports no kernel choice (a build without runtime CPU dispatch)" ;;
    Haswell|Zen|SkylakeX|Cooperlake|SapphireRapids|Excavator|Steamroller) echo "ok: BLAS kernels $core on an AVX2 CPU" ;;
    *) echo "FAIL: BLAS kernels [$core] on an AVX2 CPU"; failures=$((failures + 1)) ;;
  esac
  cores=$(OPENBLAS_CORETYPE=Haswell OPENBLAS_VERBOSE=2 "$bin" --help 2>&1 >/dev/null | sed -n 's/^Core: //p' | tr '\n' ' ')
  [ "$cores" = "Haswell " ] && echo "ok: OPENBLAS_CORETYPE is respected" ||
    { echo "FAIL: OPENBLAS_CORETYPE=Haswell gave cores [$cores]"; failures=$((failures + 1)); }
fi

echo "$failures failure(s)"
[ $failures -eq 0 ]
