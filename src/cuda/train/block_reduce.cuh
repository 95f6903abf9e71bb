#pragma once
// Block-wide reductions for the training kernels (device code only; include from .cu files). The order of the
// additions depends only on blockDim (a warp butterfly, then the warp totals in warp order), so a reduction gives
// bit-identical results from run to run: the determinism the gradient sums promise.
#include <cstdint>

#include <cuda_runtime.h>

namespace mamba3::cuda::train_detail {

constexpr int kMaxWarps = 32;

// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result. `shared` holds
// kMaxWarps values; the leading barrier lets consecutive calls reuse it.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = 0;
  for (int i = 0; i < warps; ++i) total += shared[i];
  return total;
}

// Maximum over the block, same contract as block_sum.
__device__ __forceinline__ float block_max(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float m = shared[0];
  for (int i = 1; i < warps; ++i) m = fmaxf(m, shared[i]);
  return m;
}

// Threads for a block that walks rows of `n` elements: a multiple of 32 in [32, cap].
inline int threads_for(int64_t n, int cap = 256) {
  const int64_t t = (n + 31) / 32 * 32;
  return int(t < 32 ? 32 : (t > cap ? cap : t));
}

// Whether a pointer allows 16-byte vector accesses (the launchers' test before a float4/uint4 kernel).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Blocks for a grid-stride loop over n elements.
inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65536) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

}  // namespace mamba3::cuda::train_detail
