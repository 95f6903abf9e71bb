#include <cuda_bf16.h>

#include <cmath>

#include "cuda/train/adamw_gpu.h"
#include "cuda/train/block_reduce.cuh"

namespace mamba3::cuda {
namespace {

using train_detail::block_sum;
using train_detail::grid_for;
using train_detail::kMaxWarps;

// Stage 1 of Σ g²: block b adds the elements i ≡ b·T + t (mod grid·T) in order, then its fixed-order block sum.
// The grid depends only on n, so the order of every addition is fixed. Cost: reads n floats.
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxReduceBlocks = 1024;

__global__ void sum_squares_partial_kernel(const float* g, int64_t n, double* partial) {
  __shared__ double red[kMaxWarps];
  double acc = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc += double(g[i]) * g[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Stage 2: one block adds the partials (thread t takes t, t + T, …), then the block sum; result in partial[nb].
__global__ void sum_partials_kernel(double* partial, int64_t nb) {
  __shared__ double red[kMaxWarps];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[nb] = acc;
}

__global__ void scale_kernel(float* g, int64_t n, float factor) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    g[i] *= factor;
}

__global__ void scaled_add_kernel(float* sum, const float* g, int64_t n, double scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    sum[i] = float(double(sum[i]) + scale * double(g[i]));
}

// The AdamW update of optimizer.cpp in float64 (decay = lr·wd, bc1/bc2 the bias corrections, formed on the host
// with std::pow as the CPU does). Cost: reads p, g, m, v and writes p, m, v: 28 bytes per parameter.
struct AdamWKernelParams {
  double lr, beta1, beta2, eps, decay, bc1, bc2;
};

// decay_granules (optional): per granule of kAdamWGranule floats, whether a.decay applies (else none); null: a.decay
// everywhere. grad_factor: the gradient is read as g·grad_factor (an f32 product, the bits of scale_gpu before).
// p16 (optional): the new f32 weight rounded to bf16 (nearest even) as well: 2 more bytes written per parameter.
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, AdamWKernelParams a,
                             const uint8_t* decay_granules, float grad_factor, __nv_bfloat16* p16) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double gv = g[i] * grad_factor;
    const double decay = !decay_granules || decay_granules[i / kAdamWGranule] ? a.decay : 0.0;
    const double mv = a.beta1 * m[i] + (1 - a.beta1) * gv;
    const double vv = a.beta2 * v[i] + (1 - a.beta2) * gv * gv;
    m[i] = float(mv);
    v[i] = float(vv);
    double wv = double(p[i]) * (1 - decay);
    wv -= a.lr * (mv / a.bc1) / (sqrt(vv / a.bc2) + a.eps);
    const float pw = float(wv);
    p[i] = pw;
    if (p16) p16[i] = __float2bfloat16_rn(pw);
  }
}

}  // namespace

double sum_of_squares_gpu(cudaStream_t s, const float* g, int64_t n, ReduceScratch& scratch) {
  if (n <= 0) return 0.0;
  const unsigned blocks = grid_for(n, kReduceThreads, kMaxReduceBlocks);
  scratch.partial.reserve((size_t(blocks) + 1) * sizeof(double));
  double* partial = scratch.partial.as<double>();
  sum_squares_partial_kernel<<<blocks, kReduceThreads, 0, s>>>(g, n, partial);
  MAMBA3_LAUNCH_CHECK();
  sum_partials_kernel<<<1, kReduceThreads, 0, s>>>(partial, int64_t(blocks));
  MAMBA3_LAUNCH_CHECK();
  double total = 0;
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(&total, partial + blocks, sizeof(double), cudaMemcpyDeviceToHost, s));
  MAMBA3_CUDA_CHECK(cudaStreamSynchronize(s));
  return total;
}

void scale_gpu(cudaStream_t s, float* g, int64_t n, float factor) {
  if (n <= 0) return;
  scale_kernel<<<grid_for(n, 256), 256, 0, s>>>(g, n, factor);
  MAMBA3_LAUNCH_CHECK();
}

void scaled_add_gpu(cudaStream_t s, float* sum, const float* g, int64_t n, float scale) {
  if (n <= 0) return;
  scaled_add_kernel<<<grid_for(n, 256), 256, 0, s>>>(sum, g, n, double(scale));
  MAMBA3_LAUNCH_CHECK();
}

namespace {

AdamWKernelParams kernel_params(const AdamWStepParams& a, const char* who) {
  MAMBA3_CHECK(a.t >= 1, "{}: step count {} (the first step is 1)", who, a.t);
  MAMBA3_CHECK(a.beta1 >= 0 && a.beta1 < 1 && a.beta2 >= 0 && a.beta2 < 1 && a.eps > 0 && a.weight_decay >= 0,
               "{}: betas ({}, {}) must lie in [0, 1), eps {} > 0, weight decay {} ≥ 0", who, a.beta1, a.beta2,
               a.eps, a.weight_decay);
  return {a.lr,          a.beta1, a.beta2, a.eps, a.lr * a.weight_decay, 1 - std::pow(a.beta1, double(a.t)),
          1 - std::pow(a.beta2, double(a.t))};
}

}  // namespace

void adamw_update_gpu(cudaStream_t s, float* p, const float* g, float* m, float* v, int64_t n,
                      const AdamWStepParams& a) {
  const AdamWKernelParams k = kernel_params(a, "adamw_update_gpu");
  if (n <= 0) return;
  adamw_kernel<<<grid_for(n, 256), 256, 0, s>>>(p, g, m, v, n, k, nullptr, 1.0f, nullptr);
  MAMBA3_LAUNCH_CHECK();
}

void adamw_update_flat_gpu(cudaStream_t s, float* p, const float* g, float* m, float* v, int64_t n,
                           const uint8_t* decay_granules, const AdamWStepParams& a, float grad_factor,
                           uint16_t* p16) {
  const AdamWKernelParams k = kernel_params(a, "adamw_update_flat_gpu");
  MAMBA3_CHECK(decay_granules, "adamw_update_flat_gpu: no decay granules");
  if (n <= 0) return;
  adamw_kernel<<<grid_for(n, 256), 256, 0, s>>>(p, g, m, v, n, k, decay_granules, grad_factor,
                                                reinterpret_cast<__nv_bfloat16*>(p16));
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
