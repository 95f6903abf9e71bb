#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/train/block_reduce.cuh"
#include "cuda/train/gated_mlp_train_gpu.h"
#include "cuda/train/gated_silu_math.cuh"

namespace mamba3::cuda {
namespace {

using train_detail::aligned16;
using train_detail::grid_for;

using gated_silu::sigmoid_f;  // (gated_silu_math.cuh: the fused products' epilogues share these expressions)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// Row blocks: a block per row (grid-stride over rows), threads over the row's columns (no per-element index
// division: the former flat loop's 64-bit divisions made these kernels cost instructions, not only bytes).
unsigned row_grid(int64_t rows) { return unsigned(rows < (1 << 20) ? rows : (1 << 20)); }

// MAMBA3_TRAIN_SILU_X8, read once per process: the all-bf16 forward and backward with 16-byte accesses ("1", the
// default, where the width and alignment allow) or 4-byte ones ("0"); the same bits.
bool silu_x8_enabled() {
  static const bool on = env_choice("MAMBA3_TRAIN_SILU_X8", {"1", "0"}) != "0";
  return on;
}

// o = a ⊙ silu(g), into o (f32) or o16 (rounded to bf16); h f32 or bf16 (the bf16 mode's fc1 output). Cost: reads
// 2·rows·d_ff values of h, writes rows·d_ff.
template <typename HIn>
__global__ void gated_silu_forward_kernel(const HIn* h, int64_t rows, int64_t d_ff, float* o, __nv_bfloat16* o16) {
  pdl_wait();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const HIn* hr = h + r * 2 * d_ff;
    for (int64_t j = threadIdx.x; j < d_ff; j += blockDim.x) {
      const float g = to_f(hr[d_ff + j]);
      const float v = to_f(hr[j]) * (g * sigmoid_f(g));
      if (o16) o16[r * d_ff + j] = __float2bfloat16_rn(v);
      else o[r * d_ff + j] = v;
    }
  }
}

// The all-bf16 forward (h16 in, o16 out, d_ff even): a (value, gate) pair of columns per thread step with 4-byte
// loads and stores, the kernel above's arithmetic per element (the same bits). (The 2-byte accesses ran at 2.2 TB/s,
// 70 µs per 125M layer against a ~50 µs floor, H200.)
__global__ void gated_silu_forward_bf16_kernel(const __nv_bfloat162* h, int64_t rows, int64_t half,
                                               __nv_bfloat162* o16) {
  pdl_wait();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const __nv_bfloat162* hr = h + r * 2 * half;
    for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
      const float2 a = __bfloat1622float2(hr[j]), g = __bfloat1622float2(hr[half + j]);
      o16[r * half + j] = __floats2bfloat162_rn(a.x * (g.x * sigmoid_f(g.x)), a.y * (g.y * sigmoid_f(g.y)));
    }
  }
}

// gated_silu_forward_bf16_kernel with four column pairs per thread step (16-byte loads and stores; half % 4 == 0 and
// 16-byte aligned rows): the same arithmetic per element, the same bits. (ncu, 125M: the 4-byte form waited on its
// loads at 2.8 TB/s, 48.5 µs per call.)
__global__ void gated_silu_forward_bf16x8_kernel(const uint4* h, int64_t rows, int64_t half4, uint4* o16) {
  pdl_wait();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint4* hr = h + r * 2 * half4;
    for (int64_t j = threadIdx.x; j < half4; j += blockDim.x) {
      const uint4 av = hr[j], gv = hr[half4 + j];
      const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&av);
      const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
      uint4 ov;
      __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&ov);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 a = __bfloat1622float2(a2[k]), g = __bfloat1622float2(g2[k]);
        o2[k] = __floats2bfloat162_rn(a.x * (g.x * sigmoid_f(g.x)), a.y * (g.y * sigmoid_f(g.y)));
      }
      o16[r * half4 + j] = ov;
    }
  }
}

// [da, dg] = [do·silu(g), do·a·σ(g)·(1 + g·(1 − σ(g)))], in place: each thread reads do at (r, j) before it
// writes (r, j) and (r, d_ff + j), which no other thread reads. Cost: reads 3·rows·d_ff values, writes 2·rows·d_ff.
// With dh16 the result goes, rounded to bf16, to dh16 (rows, 2·d_ff) instead, and dh is only read.
template <typename HIn>
__global__ void gated_silu_backward_kernel(const HIn* h, int64_t rows, int64_t d_ff, float* dh, __nv_bfloat16* dh16) {
  pdl_wait();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const HIn* hr = h + r * 2 * d_ff;
    float* dhr = dh + r * 2 * d_ff;
    for (int64_t j = threadIdx.x; j < d_ff; j += blockDim.x) {
      const float d_o = dhr[j], a = to_f(hr[j]), g = to_f(hr[d_ff + j]), sg = sigmoid_f(g);
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
}

// The all-bf16 backward: do (rows, d_ff) and h (rows, 2·d_ff) in, [da, dg] (rows, 2·d_ff) out, a (value, gate) pair
// of columns per thread step (d_ff even: 4-byte loads and stores), kernel above's arithmetic per element. Cost: reads
// 3·rows·d_ff bf16 values, writes 2·rows·d_ff — half the bytes of an f32 do (the backward was at its memory floor).
__global__ void gated_silu_backward_bf16_kernel(const __nv_bfloat162* do16, const __nv_bfloat162* h, int64_t rows,
                                                int64_t half, __nv_bfloat162* dh) {
  pdl_wait();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const __nv_bfloat162* hr = h + r * 2 * half;
    const __nv_bfloat162* dr = do16 + r * half;
    __nv_bfloat162* out = dh + r * 2 * half;
    for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
      const float2 d_o = __bfloat1622float2(dr[j]), a = __bfloat1622float2(hr[j]), g = __bfloat1622float2(hr[half + j]);
      const float s0 = sigmoid_f(g.x), s1 = sigmoid_f(g.y);
      const float da0 = d_o.x * g.x * s0, dg0 = d_o.x * a.x * s0 * (1.0f + g.x * (1.0f - s0));
      const float da1 = d_o.y * g.y * s1, dg1 = d_o.y * a.y * s1 * (1.0f + g.y * (1.0f - s1));
      out[j] = __floats2bfloat162_rn(da0, da1);
      out[half + j] = __floats2bfloat162_rn(dg0, dg1);
    }
  }
}

// gated_silu_backward_bf16_kernel with four column pairs per thread step (16-byte loads and stores; d_ff % 8 == 0
// and 16-byte aligned rows): the same expressions per element, the same bits. (ncu, 125M: the 4-byte form kept the
// SM's issue 75 % busy at 69 % of DRAM peak, 66 µs per call.)
__global__ void gated_silu_backward_bf16x8_kernel(const uint4* do16, const uint4* h, int64_t rows, int64_t half4,
                                                  uint4* dh) {
  pdl_wait();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint4* hr = h + r * 2 * half4;
    uint4* out = dh + r * 2 * half4;
    for (int64_t j = threadIdx.x; j < half4; j += blockDim.x) {
      const uint4 dv = do16[r * half4 + j], av = hr[j], gv = hr[half4 + j];
      const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
      const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&av);
      const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
      uint4 dav, dgv;
      __nv_bfloat162* da2 = reinterpret_cast<__nv_bfloat162*>(&dav);
      __nv_bfloat162* dg2 = reinterpret_cast<__nv_bfloat162*>(&dgv);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 d_o = __bfloat1622float2(d2[k]), a = __bfloat1622float2(a2[k]), g = __bfloat1622float2(g2[k]);
        const float s0 = sigmoid_f(g.x), s1 = sigmoid_f(g.y);
        const float da0 = d_o.x * g.x * s0, dg0 = d_o.x * a.x * s0 * (1.0f + g.x * (1.0f - s0));
        const float da1 = d_o.y * g.y * s1, dg1 = d_o.y * a.y * s1 * (1.0f + g.y * (1.0f - s1));
        da2[k] = __floats2bfloat162_rn(da0, da1);
        dg2[k] = __floats2bfloat162_rn(dg0, dg1);
      }
      out[j] = dav;
      out[half4 + j] = dgv;
    }
  }
}

// dst (cols, rows) = srcᵀ, bf16 bits, through a 32 × 33 shared tile (a 32 × 8 block: each thread 4 elements).
__global__ void transpose_bf16_kernel(const uint16_t* src, int64_t rows, int64_t cols, uint16_t* dst) {
  pdl_wait();
  __shared__ uint16_t tile[32][33];
  const int64_t r0 = int64_t(blockIdx.y) * 32, c0 = int64_t(blockIdx.x) * 32;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (c < cols && r < rows) dst[c * rows + r] = tile[threadIdx.x][i];
  }
}

}  // namespace

void transpose_bf16_gpu(cudaStream_t s, const uint16_t* src, int64_t rows, int64_t cols, uint16_t* dst) {
  if (rows <= 0 || cols <= 0) return;
  MAMBA3_CHECK((rows + 31) / 32 < 65536, "transpose_bf16_gpu: {} rows exceed the grid", rows);
  launch_train(transpose_bf16_kernel, dim3(unsigned((cols + 31) / 32), unsigned((rows + 31) / 32)), dim3(32, 8), 0, s,
               src, rows, cols, dst);
  MAMBA3_LAUNCH_CHECK();
}

void gated_silu_backward_bf16_gpu(cudaStream_t s, const uint16_t* do16, const uint16_t* h16, int64_t rows,
                                  int64_t d_ff, uint16_t* dh16) {
  if (rows <= 0 || d_ff <= 0) return;
  MAMBA3_CHECK(d_ff % 2 == 0, "gated_silu_backward_bf16_gpu: d_ff {} is odd", d_ff);
  if (d_ff % 8 == 0 && aligned16(do16) && aligned16(h16) && aligned16(dh16) && silu_x8_enabled()) {
    launch_train(gated_silu_backward_bf16x8_kernel, row_grid(rows),
                 unsigned(std::min<int64_t>(256, (d_ff / 8 + 31) / 32 * 32)), 0, s,
                 reinterpret_cast<const uint4*>(do16), reinterpret_cast<const uint4*>(h16), rows, d_ff / 8,
                 reinterpret_cast<uint4*>(dh16));
    MAMBA3_LAUNCH_CHECK();
    return;
  }
  launch_train(gated_silu_backward_bf16_kernel, row_grid(rows), 256, 0, s,
               reinterpret_cast<const __nv_bfloat162*>(do16), reinterpret_cast<const __nv_bfloat162*>(h16), rows,
               d_ff / 2, reinterpret_cast<__nv_bfloat162*>(dh16));
  MAMBA3_LAUNCH_CHECK();
}

void gated_silu_forward_gpu(cudaStream_t s, const float* h, int64_t rows, int64_t d_ff, float* o, uint16_t* o16,
                            const uint16_t* h16) {
  if (rows <= 0 || d_ff <= 0) return;
  auto* out16 = reinterpret_cast<__nv_bfloat16*>(o16);
  if (h16 && o16 && d_ff % 8 == 0 && aligned16(h16) && aligned16(o16) && silu_x8_enabled())
    launch_train(gated_silu_forward_bf16x8_kernel, row_grid(rows),
                 unsigned(std::min<int64_t>(256, (d_ff / 8 + 31) / 32 * 32)), 0, s, reinterpret_cast<const uint4*>(h16),
                 rows, d_ff / 8, reinterpret_cast<uint4*>(o16));
  else if (h16 && o16 && d_ff % 2 == 0)
    launch_train(gated_silu_forward_bf16_kernel, row_grid(rows), 256, 0, s,
                 reinterpret_cast<const __nv_bfloat162*>(h16), rows, d_ff / 2, reinterpret_cast<__nv_bfloat162*>(o16));
  else if (h16)
    launch_train(gated_silu_forward_kernel<__nv_bfloat16>, row_grid(rows), 256, 0, s,
                 reinterpret_cast<const __nv_bfloat16*>(h16), rows, d_ff, o, out16);
  else
    launch_train(gated_silu_forward_kernel<float>, row_grid(rows), 256, 0, s, h, rows, d_ff, o, out16);
  MAMBA3_LAUNCH_CHECK();
}

void gated_silu_backward_gpu(cudaStream_t s, const float* h, int64_t rows, int64_t d_ff, float* dh, uint16_t* dh16,
                             const uint16_t* h16) {
  if (rows <= 0 || d_ff <= 0) return;
  auto* out16 = reinterpret_cast<__nv_bfloat16*>(dh16);
  if (h16)
    launch_train(gated_silu_backward_kernel<__nv_bfloat16>, row_grid(rows), 256, 0, s,
                 reinterpret_cast<const __nv_bfloat16*>(h16), rows, d_ff, dh, out16);
  else
    launch_train(gated_silu_backward_kernel<float>, row_grid(rows), 256, 0, s, h, rows, d_ff, dh, out16);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
