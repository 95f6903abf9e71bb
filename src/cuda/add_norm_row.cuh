#pragma once
// The add + norm of one row by one thread block, shared by the add_norm kernel (basic_kernels.cu) and the epilogue of
// the matrix-vector kernel (gemv_small_m.cu), so that both compute a row the same way.
#include <cuda_bf16.h>

#include <cstdint>

namespace mamba3::cuda::rownorm {

__device__ __forceinline__ void store_act(void* out, int64_t i, float v, bool bf16) {
  if (bf16)
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16(v);
  else
    static_cast<float*>(out)[i] = v;
}

// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shared32) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // shared32 may still be read by a previous call
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  float total = 0;
  for (int i = 0; i < warps; ++i) total += shared32[i];
  return total;
}

// Row `row` of (rows, d) by the whole block: residual ← hidden (+ residual), out ← norm(residual). When
// d ≤ blockDim·kNormCached the row's values and weights stay in registers across the reduction, so nothing is re-read
// after it (a decode step runs this twice per block at batch 1, where its latency chain is the whole cost); the
// arithmetic is the same either way, and the sums' order depends on blockDim. kFresh: hidden and residual are read
// past L1 (written by other blocks of the running grid: the matrix-vector kernel's fused epilogue).
constexpr int kNormCached = 8;
template <bool kFresh>
__device__ __forceinline__ void add_norm_row(const float* hidden, float* residual, int64_t row, int64_t d, bool first,
                                             const float* w, const float* b, float eps, void* out, bool bf16,
                                             float* shared32) {
  auto load = [](const float* p) { return kFresh ? __ldcg(p) : *p; };
  const float* h = hidden + row * d;
  float* r = residual + row * d;
  const int64_t stride = blockDim.x;
  if (d <= stride * kNormCached) {
    float v[kNormCached], wv[kNormCached], bv[kNormCached];
    float sum = 0, sumsq = 0;
#pragma unroll
    for (int i = 0; i < kNormCached; ++i) {
      const int64_t j = threadIdx.x + i * stride;
      v[i] = 0.0f;
      if (j < d) {
        v[i] = first ? load(h + j) : load(h + j) + load(r + j);
        wv[i] = w[j];
        bv[i] = b ? b[j] : 0.0f;
        r[j] = v[i];
        sum += v[i];
        sumsq += v[i] * v[i];
      }
    }
    float mean = 0, rstd;
    if (b) {
      mean = block_sum(sum, shared32) / float(d);
      float dev = 0;  // second pass for the variance: numerically safer than E[x²] − mean²
#pragma unroll
      for (int i = 0; i < kNormCached; ++i) {
        if (threadIdx.x + i * stride < d) {
          const float c = v[i] - mean;
          dev += c * c;
        }
      }
      rstd = rsqrtf(block_sum(dev, shared32) / float(d) + eps);
    } else {
      rstd = rsqrtf(block_sum(sumsq, shared32) / float(d) + eps);
    }
#pragma unroll
    for (int i = 0; i < kNormCached; ++i) {
      const int64_t j = threadIdx.x + i * stride;
      if (j < d) {
        float o = (v[i] - mean) * rstd * wv[i];
        if (b) o += bv[i];
        store_act(out, row * d + j, o, bf16);
      }
    }
    return;
  }
  float sum = 0, sumsq = 0;
  for (int64_t j = threadIdx.x; j < d; j += stride) {
    float v = first ? load(h + j) : load(h + j) + load(r + j);
    r[j] = v;
    sum += v;
    sumsq += v * v;
  }
  float mean = 0, rstd;
  if (b) {
    mean = block_sum(sum, shared32) / float(d);
    float dev = 0;
    for (int64_t j = threadIdx.x; j < d; j += stride) {
      float c = r[j] - mean;
      dev += c * c;
    }
    rstd = rsqrtf(block_sum(dev, shared32) / float(d) + eps);
  } else {
    rstd = rsqrtf(block_sum(sumsq, shared32) / float(d) + eps);
  }
  for (int64_t j = threadIdx.x; j < d; j += stride) {
    float v = (r[j] - mean) * rstd * w[j];
    if (b) v += b[j];
    store_act(out, row * d + j, v, bf16);
  }
}

}  // namespace mamba3::cuda::rownorm
