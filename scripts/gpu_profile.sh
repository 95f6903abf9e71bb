#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_run.sh has unpacked the bundle into run/: a per-kernel time table (ncu
# SpeedOfLight: duration, DRAM and SM throughput, averaged per kernel name) of one phase of `mamba3 bench`.
#   scripts/gpu_profile.sh decode PRESET BATCH   — kernels of graph-replayed decode steps (after warm-up)
#   scripts/gpu_profile.sh prefill PRESET BATCH  — the Mamba-3 kernels of a prefill of 128 tokens per sequence
#     (the products are cuBLAS's; bench prints their GEMM-bound floor)
#   scripts/gpu_profile.sh train PRESET          — the kernels of a training step (batch 8 × 2048; the first 1500
#     launches of the first step by default), cuBLAS's included
#   scripts/gpu_profile.sh details PRESET BATCH KERNEL_REGEX [OUT_FILE]  — ncu's full set for one graph-replayed
#     decode launch of the matching kernel: the key lines (duration, DRAM, registers, occupancy, issue rate, stall
#     reasons, instructions) to stdout, the whole details page to OUT_FILE (default ncu_details.txt in the project root)
#   scripts/gpu_profile.sh train-details PRESET KERNEL_REGEX [OUT_FILE]  — the same for one launch of the matching
#     kernel in a training step (SKIP matching launches passed over first, default 2)
# ncu runs kernels at its locked base clocks, one at a time: compare kernels with each other, not with bench times.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?decode, prefill or details}
preset=${2:-1.5b}
batch=${3:-128}
# The lines of an ncu details page worth reading first.
summarize_details() {
  local metrics="Duration|DRAM Throughput|Registers Per Thread|Achieved Active Warps Per SM|Theoretical Occupancy"
  metrics+="|Issued Ipc Active|Warp Cycles Per Issued Instruction|Instructions Executed|Stall [A-Z][a-z]+( [A-Z][a-z]+)?"
  grep -E "^\s+($metrics) " "$1" |
    sed -E 's/ +/ /g' | awk '!seen[$0]++'
}
export LD_LIBRARY_PATH="$PWD/run/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
if [[ $phase == details || $phase == train-details ]]; then
  if [[ $phase == details ]]; then
    kernel=${4:?details needs a kernel name regex}
    out=${5:-ncu_details.txt}
    skip=30 args=(--batch "$batch" --prompt 8 --steps 3 --lengths 16 --max-decode-steps 2)
  else  # train-details PRESET KERNEL_REGEX [OUT_FILE]: a launch of the first training step (SKIP: matching launches passed over)
    kernel=${3:?train-details needs a kernel name regex}
    out=${4:-ncu_details.txt}
    skip=${SKIP:-2} args=(--train --steps 1)
  fi
  rep=$(mktemp -u).ncu-rep
  ncu --graph-profiling node -k "regex:$kernel" --launch-skip "$skip" --launch-count 1 --set full -o "${rep%.ncu-rep}" \
    run/bin/mamba3 bench --device cuda --preset "$preset" "${args[@]}" >/dev/null 2>&1 ||
    { echo "ncu failed for $kernel" >&2; exit 1; }
  ncu -i "$rep" --page details --print-details all > "$out" 2>&1
  rm -f "$rep"
  summarize_details "$out"
  exit 0
fi
case "$phase" in
  decode)  # everything after the warm-up: GEMMs, norms, staging, state kernels, sampling
    skip=400 count=${COUNT:-150} filter=regex:.
    args=(--prompt 8 --steps 3 --lengths 16 --max-decode-steps 2) ;;
  prefill)  # the Mamba-3 prefill kernels of the long run; the batch-1 run's 16-token prefill (72 launches) is skipped
            # (decode steps launch none of these kernels: one head decode kernel per layer)
    skip=72 count=${COUNT:-144} filter='regex:mamba3_(angle|stage|chunk)_kernel'
    args=(--prompt 16 --steps 1 --long-batch "$batch" --lengths 128 --max-decode-steps 1) ;;
  train)  # the first launches of the first (warm-up) step: per-kernel averages; SKIP and COUNT move the window
    skip=${SKIP:-0} count=${COUNT:-1500} filter=regex:.
    args=(--train --steps 2) ;;
  *) echo "phase must be decode, prefill, train or details" >&2; exit 2 ;;
esac
[[ $phase == train ]] || args=(--batch "$batch" "${args[@]}")
ncu --graph-profiling node -k "$filter" --launch-skip "$skip" --launch-count "$count" --section SpeedOfLight \
  --print-summary per-kernel run/bin/mamba3 bench --device cuda --preset "$preset" "${args[@]}" 2>&1 |
  grep -E "^\s+[a-zA-Z_].*\(|Duration|DRAM Throughput|Compute \(SM\)|Invocations"
