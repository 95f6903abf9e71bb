#include <cuda_bf16.h>

#include <cmath>

#include "cuda/pdl.h"
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
  pdl_wait();
  __shared__ double red[kMaxWarps];
  double acc = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc += double(g[i]) * g[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Stage 2: one block adds the partials (thread t takes t, t + T, …), then the block sum; result in partial[nb].
__global__ void sum_partials_kernel(double* partial, int64_t nb) {
  pdl_wait();
  __shared__ double red[kMaxWarps];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[nb] = acc;
}

__global__ void scale_kernel(float* g, int64_t n, float factor) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    g[i] *= factor;
}

__global__ void scaled_add_kernel(float* sum, const float* g, int64_t n, double scale) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    sum[i] = float(double(sum[i]) + scale * double(g[i]));
}

// The AdamW update of optimizer.cpp in float64 (decay = lr·wd, bc1/bc2 the bias corrections, formed on the host
// with std::pow as the CPU does). Cost: reads p, g, m, v and writes p, m, v: 28 bytes per parameter.
struct AdamWKernelParams {
  double lr, beta1, beta2, eps, decay, bc1, bc2;
};

// One parameter's update, the multiply-adds written out (__fma_rn, __dmul_rn) so that every kernel that calls it
// rounds the same way whatever the compiler would contract (the scalar and the four-wide kernel give the same bits).
__device__ __forceinline__ float adamw_element(float& p, float g, float& m, float& v, const AdamWKernelParams& a,
                                               double decay, float grad_factor) {
  const double gv = __fmul_rn(g, grad_factor);
  const double mv = __fma_rn(a.beta1, double(m), __dmul_rn(1 - a.beta1, gv));
  const double vv = __fma_rn(a.beta2, double(v), __dmul_rn(__dmul_rn(1 - a.beta2, gv), gv));
  m = float(mv);
  v = float(vv);
  const double step = a.lr * (mv / a.bc1) / (sqrt(vv / a.bc2) + a.eps);
  p = float(__dsub_rn(__dmul_rn(double(p), 1 - decay), step));
  return p;
}

// decay_granules (optional): per granule of kAdamWGranule floats, whether a.decay applies (else none); null: a.decay
// everywhere. grad_factor: the gradient is read as g·grad_factor (an f32 product, the bits of scale_gpu before).
// p16 (optional): the new f32 weight rounded to bf16 (nearest even) as well: 2 more bytes written per parameter.
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, AdamWKernelParams a,
                             const uint8_t* decay_granules, float grad_factor, __nv_bfloat16* p16) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double decay = !decay_granules || decay_granules[i / kAdamWGranule] ? a.decay : 0.0;
    const float pw = adamw_element(p[i], g[i], m[i], v[i], a, decay, grad_factor);
    if (p16) p16[i] = __float2bfloat16_rn(pw);
  }
}

// The same update, four consecutive parameters per thread and step: float4 loads and stores of p, g, m and v (and 8
// bytes of p16), so a thread has four times the bytes in flight (the scalar kernel reached ~3.2 TB/s of the H200's
// ~4.1). Each element's arithmetic is adamw_kernel's, so the bits are too. Needs n % 4 == 0 and 16-byte aligned
// arrays (8-byte p16); the four share a decay granule (kAdamWGranule is a multiple of 4).
static_assert(kAdamWGranule % 4 == 0, "four parameters per thread share a granule");
__global__ void adamw_flat4_kernel(float4* p, const float4* g, float4* m, float4* v, int64_t quads,
                                   AdamWKernelParams a, const uint8_t* decay_granules, float grad_factor, uint2* p16) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < quads; i += int64_t(gridDim.x) * blockDim.x) {
    float4 pv = p[i], mv = m[i], vv = v[i];
    const float4 gv = g[i];
    const double decay = decay_granules[i * 4 / kAdamWGranule] ? a.decay : 0.0;
    adamw_element(pv.x, gv.x, mv.x, vv.x, a, decay, grad_factor);
    adamw_element(pv.y, gv.y, mv.y, vv.y, a, decay, grad_factor);
    adamw_element(pv.z, gv.z, mv.z, vv.z, a, decay, grad_factor);
    adamw_element(pv.w, gv.w, mv.w, vv.w, a, decay, grad_factor);
    p[i] = pv, m[i] = mv, v[i] = vv;
    if (p16) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(pv.x, pv.y), hi = __floats2bfloat162_rn(pv.z, pv.w);
      p16[i] = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
    }
  }
}

}  // namespace

double sum_of_squares_gpu(cudaStream_t s, const float* g, int64_t n, ReduceScratch& scratch) {
  if (n <= 0) return 0.0;
  const unsigned blocks = grid_for(n, kReduceThreads, kMaxReduceBlocks);
  scratch.partial.reserve((size_t(blocks) + 1) * sizeof(double));
  double* partial = scratch.partial.as<double>();
  launch_train(sum_squares_partial_kernel, blocks, kReduceThreads, 0, s, g, n, partial);
  MAMBA3_LAUNCH_CHECK();
  launch_train(sum_partials_kernel, 1, kReduceThreads, 0, s, partial, int64_t(blocks));
  MAMBA3_LAUNCH_CHECK();
  double total = 0;
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(&total, partial + blocks, sizeof(double), cudaMemcpyDeviceToHost, s));
  MAMBA3_CUDA_CHECK(cudaStreamSynchronize(s));
  return total;
}

void scale_gpu(cudaStream_t s, float* g, int64_t n, float factor) {
  if (n <= 0) return;
  launch_train(scale_kernel, grid_for(n, 256), 256, 0, s, g, n, factor);
  MAMBA3_LAUNCH_CHECK();
}

void scaled_add_gpu(cudaStream_t s, float* sum, const float* g, int64_t n, float scale) {
  if (n <= 0) return;
  launch_train(scaled_add_kernel, grid_for(n, 256), 256, 0, s, sum, g, n, double(scale));
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
  launch_train(adamw_kernel, grid_for(n, 256), 256, 0, s, p, g, m, v, n, k, nullptr, 1.0f, nullptr);
  MAMBA3_LAUNCH_CHECK();
}

void adamw_update_flat_gpu(cudaStream_t s, float* p, const float* g, float* m, float* v, int64_t n,
                           const uint8_t* decay_granules, const AdamWStepParams& a, float grad_factor,
                           uint16_t* p16) {
  const AdamWKernelParams k = kernel_params(a, "adamw_update_flat_gpu");
  MAMBA3_CHECK(decay_granules, "adamw_update_flat_gpu: no decay granules");
  if (n <= 0) return;
  const auto aligned = [](const void* q, uintptr_t to) { return reinterpret_cast<uintptr_t>(q) % to == 0; };
  if (n % 4 == 0 && aligned(p, 16) && aligned(g, 16) && aligned(m, 16) && aligned(v, 16) && aligned(p16, 8)) {
    const int64_t quads = n / 4;
    launch_train(adamw_flat4_kernel, grid_for(quads, 256), 256, 0, s, reinterpret_cast<float4*>(p),
                 reinterpret_cast<const float4*>(g), reinterpret_cast<float4*>(m), reinterpret_cast<float4*>(v), quads,
                 k, decay_granules, grad_factor, reinterpret_cast<uint2*>(p16));
  } else {
    launch_train(adamw_kernel, grid_for(n, 256), 256, 0, s, p, g, m, v, n, k, decay_granules, grad_factor,
                 reinterpret_cast<__nv_bfloat16*>(p16));
  }
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
