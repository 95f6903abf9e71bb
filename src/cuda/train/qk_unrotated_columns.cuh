#pragma once
// The q and k tiles of a chunk when the SISO build stored only their rotated columns (BatchedParams::qk_rotated_only):
// at rope_fraction 0.5 (S = N/4) the coordinates [N/2, N) do not rotate, so there q = c + bias_C and k = b + bias_B —
// the group's normalised C/B row (zx, shared by the group's heads) plus the head's bias. Storing them per head cost
// the build 100 MB of writes per 125M layer and every reader (the chains, the forward core, the fused backward core)
// as much again to read. A reader now copies the rotated half from Q/K (row pitch N/2) and forms the other half from
// the group's rows — a compact f32 copy of them that the B/C normalisation writes (bc_unrot: 8 MB per 125M layer,
// L2-resident while the heads read it, where zx's own rows are 14 KB apart) — with
// rotated_pair's unrotated branch: bf16(c + bias), the build's bits, so the tiles are the same as when the build stored
// them whole.
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/train/chunk_core_launch.cuh"
#include "cuda/train/mamba3_train_batched_common.cuh"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mma_bf16.cuh"

namespace mamba3::cuda::train_detail {

// The chunk (b·H + h)·nc + c of a block in the head-fastest order (b, c, h).
__device__ __forceinline__ int64_t head_fastest_chunk(const BatchedParams& p) {
  const int64_t i = blockIdx.x, h = i % p.d.H, bc = i / p.d.H, c = bc % p.nc, b = bc / p.nc;
  return (b * p.d.H + h) * p.nc + c;
}

// The unrotated columns of kTensors tiles (64 rows each) for a block of kThreads: issue() loads a thread's pieces of
// the rows (4 floats a piece) into registers, store() adds the biases and writes them to the shared tiles. Between the
// two the caller has the loads in flight with its other copies (no round trip before them).
template <int N, int kThreads, int kTensors>
struct UnrotatedColumns {
  static constexpr int kRows = kCoreRows, NR = N / 2, NU = N - NR, kPieces = NU / 4;
  static_assert(kThreads % kPieces == 0 && (kRows * kPieces) % kThreads == 0, "whole passes, a column per thread");
  static constexpr int kIter = kRows * kPieces / kThreads, kRowStep = kThreads / kPieces;
  float4 v[kTensors][kIter];
  const float* bias[kTensors];  // (the thread's four columns of each bias, read at store(): fewer live registers)

  // is_q[t]: tile t is q (C's rows and C_bias) or k (B's, B_bias). chunk: the block's (sequence, head, chunk); the
  // chunk must be whole (L a multiple of T: qk_rotated_only_supported).
  __device__ __forceinline__ void issue(const BatchedParams& p, int64_t chunk, const bool (&is_q)[kTensors]) {
    const MixerDims& d = p.d;
    const int64_t bh = chunk / p.nc;
    const int h = int(bh % d.H), g = h / (d.H / d.G), c4 = int(threadIdx.x) % kPieces * 4;
    const int64_t tok0 = bh / d.H * d.L + chunk % p.nc * p.T + int(threadIdx.x) / kPieces;
    const int pitch = 2 * d.G * NU;  // (bc_unrot's token rows: B's G vectors, then C's)
#pragma unroll
    for (int t = 0; t < kTensors; ++t) {
      const float* row = p.bc_unrot + tok0 * pitch + ((is_q[t] ? d.G : 0) + g) * NU + c4;
      bias[t] = (is_q[t] ? p.C_bias : p.B_bias) + int64_t(h) * N + NR + c4;
#pragma unroll
      for (int j = 0; j < kIter; ++j) v[t][j] = __ldg(reinterpret_cast<const float4*>(row + j * kRowStep * pitch));
    }
  }

  // The formed columns into tiles[t] (rows at pitch ld, bf16); visible to the block after its next barrier.
  __device__ __forceinline__ void store(__nv_bfloat16* const (&tiles)[kTensors], int ld) const {
    const int r0 = int(threadIdx.x) / kPieces, c = NR + int(threadIdx.x) % kPieces * 4;
#pragma unroll
    for (int t = 0; t < kTensors; ++t) {
      const float4 b = *reinterpret_cast<const float4*>(bias[t]);
#pragma unroll
      for (int j = 0; j < kIter; ++j) {
        const float4 x = v[t][j];
        __nv_bfloat162 o[2] = {batched::rotated_pair(x.x, x.y, b.x, b.y, 1.0f, 0.0f, false),
                               batched::rotated_pair(x.z, x.w, b.z, b.w, 1.0f, 0.0f, false)};
        *reinterpret_cast<uint2*>(tiles[t] + (r0 + j * kRowStep) * ld + c) = *reinterpret_cast<const uint2*>(o);
      }
    }
  }
};

// The chunk's q and k tiles into sQ and sK (rows at pitch ld) by cp.async, not committed: whole rows from Q and K, or
// with kHalf (p.qk_rotated_only) their rotated columns [0, N/2), whose rows are then N/2 apart.
template <int kThreads, int N, bool kHalf>
__device__ __forceinline__ void copy_qk_tiles(__nv_bfloat16* sQ, __nv_bfloat16* sK, int ld, const BatchedParams& p,
                                              int64_t chunk) {
  constexpr int cols = kHalf ? N / 2 : N;
  mma_bf16::copy_tile<kThreads, kCoreRows, cols>(sQ, ld,
                                                 static_cast<const __nv_bfloat16*>(p.Q) + chunk * kCoreRows * cols);
  mma_bf16::copy_tile<kThreads, kCoreRows, cols>(sK, ld,
                                                 static_cast<const __nv_bfloat16*>(p.K) + chunk * kCoreRows * cols);
}

}  // namespace mamba3::cuda::train_detail
