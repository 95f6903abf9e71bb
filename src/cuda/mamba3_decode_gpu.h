#pragma once
// The staged path's decode state step (L = 1) as a pure stream over the state: one block per (sequence, head), each
// lane holding its float4 slices of k_{−1}, k and q in registers and RG rows of the head's P×N state in flight as
// float4 loads; the update, the y reduction (warp shuffles) and the output stage follow, and nothing passes through
// shared memory but the P·R outputs y. It replaces the cp.async decode kernel of mamba3_stage_gpu.cu, which ncu
// showed bound by instruction issue (scalar shared-memory reads of k/q per state element, 4-byte copies), not by
// DRAM: 1.5B SISO b128 206 µs per layer at 54 % of DRAM throughput, MIMO R = 4 510 µs at 23 % (H200, 2026-12-01).
//
// Inputs are what the angle scan and the staging kernel wrote for the token (k slot 0 = k_{−1}, slot 1 = k, q,
// α/β/γ), x and z from the in_proj output and the v state; outputs: ssm and v states, the gated output o.
// Reach: N a multiple of 4 and ≤ 256, P ≤ 128, R ≤ 4, 16-byte aligned state and stage; otherwise
// mamba3_head_decode_gpu returns false and the caller runs the older kernel.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/mamba3_gpu.h"

namespace mamba3::cuda {

struct Mamba3DecodeArgs {
  int H, P, N, R;
  int d_in, d_inner, off_x;
  bool mimo, o_bf16;
  Mamba3GpuParams p;
  const float* zx;  // (batch, d_in) in_proj output of the token
  Mamba3GpuState st;
  Mamba3GpuStage sg;  // the staged token (tokens = 1)
  void* o;            // (batch, d_inner) f32 or bf16
};

// Launches the decode state step for `batch` rows; false (nothing launched) when the shape is out of reach.
bool mamba3_head_decode_gpu(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch);

}  // namespace mamba3::cuda
