#include <cuda_bf16.h>

#include "cuda/train/block_reduce.cuh"
#include "cuda/train/gated_mlp_train_gpu.h"

namespace mamba3::cuda {
namespace {

using train_detail::grid_for;

// f32 silu with the CPU's formula (ops/mamba3_common.h): σ(g) = 1/(1 + e^−g), silu(g) = g·σ(g).
__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + expf(-g)); }

// o = a ⊙ silu(g), into o (f32) or o16 (rounded to bf16). Cost: reads 2·rows·d_ff floats, writes rows·d_ff.
__global__ void gated_silu_forward_kernel(const float* h, int64_t rows, int64_t d_ff, float* o,
                                          __nv_bfloat16* o16) {
  const int64_t n = rows * d_ff;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / d_ff, j = i - r * d_ff;
    const float* hr = h + r * 2 * d_ff;
    const float g = hr[d_ff + j];
    const float v = hr[j] * (g * sigmoid_f(g));
    if (o16) o16[i] = __float2bfloat16_rn(v);
    else o[i] = v;
  }
}

// [da, dg] = [do·silu(g), do·a·σ(g)·(1 + g·(1 − σ(g)))], in place: each thread reads do at (r, j) before it
// writes (r, j) and (r, d_ff + j), which no other thread reads. Cost: reads 3·rows·d_ff floats, writes 2·rows·d_ff.
// With dh16 the result goes, rounded to bf16, to dh16 (rows, 2·d_ff) instead, and dh is only read.
__global__ void gated_silu_backward_kernel(const float* h, int64_t rows, int64_t d_ff, float* dh,
                                           __nv_bfloat16* dh16) {
  const int64_t n = rows * d_ff;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / d_ff, j = i - r * d_ff;
    const float* hr = h + r * 2 * d_ff;
    float* dhr = dh + r * 2 * d_ff;
    const float d_o = dhr[j], a = hr[j], g = hr[d_ff + j], sg = sigmoid_f(g);
    const float da = d_o * g * sg, dg = d_o * a * sg * (1.0f + g * (1.0f - sg));
    if (dh16) {
      dh16[r * 2 * d_ff + j] = __float2bfloat16_rn(da);
      dh16[r * 2 * d_ff + d_ff + j] = __float2bfloat16_rn(dg);
    } else {
      dhr[j] = da;
      dhr[d_ff + j] = dg;
    }
  }
}

}  // namespace

void gated_silu_forward_gpu(cudaStream_t s, const float* h, int64_t rows, int64_t d_ff, float* o, uint16_t* o16) {
  if (rows <= 0 || d_ff <= 0) return;
  gated_silu_forward_kernel<<<grid_for(rows * d_ff, 256), 256, 0, s>>>(h, rows, d_ff, o,
                                                                       reinterpret_cast<__nv_bfloat16*>(o16));
  MAMBA3_LAUNCH_CHECK();
}

void gated_silu_backward_gpu(cudaStream_t s, const float* h, int64_t rows, int64_t d_ff, float* dh,
                             uint16_t* dh16) {
  if (rows <= 0 || d_ff <= 0) return;
  gated_silu_backward_kernel<<<grid_for(rows * d_ff, 256), 256, 0, s>>>(h, rows, d_ff, dh,
                                                                        reinterpret_cast<__nv_bfloat16*>(dh16));
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
