#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_run.sh has unpacked the bundle into run/: a per-kernel time table (ncu
# SpeedOfLight: duration, DRAM and SM throughput, averaged per kernel name) of one phase of `mamba3 bench`.
#   scripts/gpu_profile.sh decode PRESET BATCH   — kernels of graph-replayed decode steps (after warm-up)
#   scripts/gpu_profile.sh prefill PRESET BATCH  — the Mamba-3 kernels of a prefill of 128 tokens per sequence
#     (the products are cuBLAS's; bench prints their GEMM-bound floor)
# ncu runs kernels at its locked base clocks, one at a time: compare kernels with each other, not with bench times.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?decode or prefill}
preset=${2:-1.5b}
batch=${3:-128}
export LD_LIBRARY_PATH="$PWD/run/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
case "$phase" in
  decode)  # everything after the warm-up: GEMMs, norms, staging, state kernels, sampling
    skip=400 count=${COUNT:-150} filter=regex:.
    args=(--batch "$batch" --prompt 8 --steps 3 --lengths 16 --max-decode-steps 2) ;;
  prefill)  # the Mamba-3 prefill kernels of the long run; the batch-1 run's 16-token prefill (72 launches) is skipped —
            # SISO presets only: a MIMO decode step also launches the angle and staging kernels
    skip=72 count=${COUNT:-144} filter='regex:mamba3_(angle|stage|chunk)_kernel'
    args=(--batch 1 --prompt 16 --steps 1 --long-batch "$batch" --lengths 128 --max-decode-steps 1) ;;
  *) echo "phase must be decode or prefill" >&2; exit 2 ;;
esac
ncu --graph-profiling node -k "$filter" --launch-skip "$skip" --launch-count "$count" --section SpeedOfLight \
  --print-summary per-kernel run/bin/mamba3 bench --device cuda --preset "$preset" "${args[@]}" 2>&1 |
  grep -E "^\s+[a-zA-Z_].*\(|Duration|DRAM Throughput|Compute \(SM\)|Invocations"
