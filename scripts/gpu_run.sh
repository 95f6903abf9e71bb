#!/usr/bin/env bash
# On the GPU machine: unpacks gpu-bundle/bundle.tar.xz (made by scripts/gpu_bundle.sh), runs every CUDA test binary
# (the `cuda` ctest label), compute-sanitizer passes (memcheck by default) at small sizes
# (MAMBA3_TEST_SANITIZER_SIZES=1: tests that read it shrink their batches), and the benchmark given in BENCH_ARGS.
# Logs go to $OUT. Usage: OUT=… BENCH_ARGS="--preset 1.5b" [TESTS='test_*train* test_adamw*'] [SANITIZE_BIN=test_x]
# [SANITIZE_FILTER='gtest filter' [SANITIZE_TOOLS='memcheck racecheck synccheck']] [CLI_TESTS=0] [VARIANTS=0]
# [TEST_TIMEOUT=seconds per binary]
# scripts/gpu_run.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-out}
mkdir -p "$OUT" run
tar -C run -xJf gpu-bundle/bundle.tar.xz
export LD_LIBRARY_PATH="$PWD/run/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}"
export MAMBA3_GOLDEN_DIR="$PWD/golden"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
status=0
if [[ $what == tests || $what == all ]]; then
  # run_test NAME COMMAND…: runs a test binary under the time bound, logs to $OUT/NAME.log, prints PASS or FAIL.
  run_test() {
    local name=$1; shift
    if timeout "${TEST_TIMEOUT:-400}" "$@" --gtest_brief=1 > "$OUT/$name.log" 2>&1; then
      echo "PASS $name"
    else
      echo "FAIL $name"; status=1; tail -40 "$OUT/$name.log"
    fi
  }
  # TESTS: space-separated globs of test binaries (default every one); their ctest variants run with them.
  declare -A selected=()
  for pattern in ${TESTS:-test_*}; do
    for t in run/bin/$pattern; do
      [[ -x $t ]] || continue
      selected[$(basename "$t")]=1
      run_test "$(basename "$t")" "$t"
    done
  done
  # The ctest entries that rerun a binary under other arguments or settings, as gpu_bundle.sh listed them from ctest.
  if [[ ${VARIANTS:-1} != 0 && -f run/variants.txt ]]; then
    while IFS='|' read -r -u 3 name bin args envs; do
      [[ -x run/bin/$bin && -n ${selected[$bin]:-} ]] || continue
      read -r -a arguments <<< "$args"
      read -r -a assignments <<< "$envs"
      run_test "$name" env "${assignments[@]}" "run/bin/$bin" "${arguments[@]}"
    done 3< run/variants.txt
  fi
  for s in tests/cuda/*.sh; do  # CLI tests on the GPU (they take the binary; CLI_TESTS=0 skips them)
    [[ ${CLI_TESTS:-1} == 0 ]] && break
    name=$(basename "$s" .sh)
    if bash "$s" run/bin/mamba3 > "$OUT/$name.log" 2>&1; then
      echo "PASS $name"
    else
      echo "FAIL $name"; status=1; tail -20 "$OUT/$name.log"
    fi
  done
  if [[ -n ${SANITIZE_FILTER:-} ]]; then
    for tool in ${SANITIZE_TOOLS:-memcheck}; do
      log="$OUT/$tool.log"
      MAMBA3_TEST_SANITIZER_SIZES=1 compute-sanitizer --tool "$tool" run/bin/${SANITIZE_BIN:-test_mamba3_gpu} \
        --gtest_filter="$SANITIZE_FILTER" > "$log" 2>&1
      rc=$?
      # racecheck cannot model the asynchronous (TMA, mbarrier) shared-memory traffic of cuBLAS's own Hopper kernels
      # (nvjet_*) and reports hazards inside them; only hazards in other kernels count. initcheck is not offered:
      # it does not see cuBLAS's writes and flags every read of a product's output (docs/perf.md, 32nd session).
      ours=$(grep -E "ERROR SUMMARY: [1-9]|Race reported" "$log" | grep -v "nvjet_" || true)
      if [[ $rc -eq 0 && -z $ours ]] && grep -q "PASSED" "$log"; then
        echo "PASS $tool"
      else
        echo "FAIL $tool (rc $rc)"; status=1; echo "$ours" | head -10; tail -20 "$log"
      fi
    done
  fi
fi
if [[ $what == bench || $what == all ]]; then
  run/bin/mamba3 bench --device cuda ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
fi
exit $status
