#include <cuda_bf16.h>

#include "cuda/basic_kernels.h"
#include "cuda/gated_silu.cuh"
#include "cuda/pdl.h"

namespace mamba3::cuda {
namespace {

__device__ __forceinline__ void store_act(void* out, int64_t i, float v, bool bf16) {
  if (bf16)
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16(v);
  else
    static_cast<float*>(out)[i] = v;
}

__device__ __forceinline__ float load_weight(const void* w, int64_t i, bool bf16) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]) : static_cast<const float*>(w)[i];
}

// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
__device__ float block_sum(float v, float* shared32) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // shared32 may still be read by a previous call
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  float total = 0;
  for (int i = 0; i < warps; ++i) total += shared32[i];
  return total;
}

__global__ void add_bias_kernel(float* y, int64_t m, int64_t n, int64_t ld, const float* bias) {
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    y[(i / n) * ld + i % n] += bias[i % n];
}

__global__ void embed_kernel(const int32_t* ids, const void* table, bool bf16, int64_t d, float* out) {
  const int64_t row = blockIdx.x, id = ids[row];
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[row * d + j] = load_weight(table, id * d + j, bf16);
}

// One block per row: residual ← hidden (+ residual), out ← norm(residual). When d ≤ blockDim·kNormCached the row's
// values and weights stay in registers across the reduction, so nothing is re-read after it (a decode step runs this
// twice per block at batch 1, where its latency chain is the whole cost); the arithmetic is the same either way.
constexpr int kNormCached = 8;
__global__ void add_norm_kernel(const float* hidden, float* residual, int64_t d, bool first, const float* w,
                                const float* b, float eps, void* out, bool bf16) {
  __shared__ float shared32[32];
  pdl_trigger();
  pdl_wait();
  const int64_t row = blockIdx.x;
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
        v[i] = first ? h[j] : h[j] + r[j];
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
    float v = first ? h[j] : h[j] + r[j];
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

// in: rows of f (value, gate) pairs, as fc1 computes them with its rows interleaved (cuda_model.cpp).
__global__ void gated_silu_kernel(const float2* in, int64_t rows, int64_t f, void* out, bool bf16) {
  pdl_trigger();
  pdl_wait();
  const int64_t total = rows * f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const float2 yg = in[i];
    store_act(out, i, gated_silu_value(yg.x, yg.y), bf16);
  }
}

__global__ void to_activation_kernel(const float* in, int64_t n, void* out, bool bf16) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_act(out, i, in[i], bf16);
}

__global__ void bf16_to_f32_kernel(const uint16_t* in, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __uint_as_float(uint32_t(in[i]) << 16);
}

unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return unsigned(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

}  // namespace

void add_bias(cudaStream_t s, float* y, int64_t m, int64_t n, int64_t ld, const float* bias) {
  add_bias_kernel<<<grid_for(m * n, 256), 256, 0, s>>>(y, m, n, ld, bias);
  MAMBA3_LAUNCH_CHECK();
}

void embed(cudaStream_t s, const int32_t* ids, int64_t rows, const void* table, Precision table_precision, int64_t d,
           float* out) {
  if (rows == 0) return;
  embed_kernel<<<unsigned(rows), 256, 0, s>>>(ids, table, table_precision == Precision::BF16, d, out);
  MAMBA3_LAUNCH_CHECK();
}

void add_norm(cudaStream_t s, const float* hidden, float* residual, int64_t rows, int64_t d, bool first,
              const float* w, const float* b, float eps, void* out, Precision out_precision) {
  if (rows == 0) return;
  const int threads = d >= 1024 ? 512 : (d >= 256 ? 256 : 128);
  launch_pdl(pdl_small(rows), add_norm_kernel, unsigned(rows), threads, 0, s, hidden, residual, d, first, w, b, eps,
             out, out_precision == Precision::BF16);
}

void gated_silu(cudaStream_t s, const float* in, int64_t rows, int64_t f, void* out, Precision out_precision) {
  if (rows * f == 0) return;
  launch_pdl(pdl_small(rows), gated_silu_kernel, grid_for(rows * f, 256), 256, 0, s,
             reinterpret_cast<const float2*>(in), rows, f, out, out_precision == Precision::BF16);
}

void to_activation(cudaStream_t s, const float* in, int64_t n, void* out, Precision out_precision) {
  if (n == 0) return;
  to_activation_kernel<<<grid_for(n, 256), 256, 0, s>>>(in, n, out, out_precision == Precision::BF16);
  MAMBA3_LAUNCH_CHECK();
}

void bf16_to_f32(cudaStream_t s, const uint16_t* in, int64_t n, float* out) {
  if (n == 0) return;
  bf16_to_f32_kernel<<<grid_for(n, 256), 256, 0, s>>>(in, n, out);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
