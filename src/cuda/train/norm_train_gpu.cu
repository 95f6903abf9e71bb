#include <cuda_bf16.h>

#include <algorithm>
#include <type_traits>

#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/train/block_reduce.cuh"
#include "cuda/train/norm_train_gpu.h"

namespace mamba3::cuda {
namespace {

using train_detail::block_sum;
using train_detail::grid_for;
using train_detail::kMaxWarps;
using train_detail::aligned16;
using train_detail::threads_for;

// Blocks of rows in the backward: enough to fill the GPU, few enough that the partials (blocks·D floats) stay
// small. Depends only on `rows`, so the summation order — and the result — is the same on every call.
// (512 blocks of 32 rows each left the 125M step's norm backward latency-bound: 0.19 ms per call against ~0.05 of
// traffic; 2048 blocks of 8 rows with the warp-per-column second stage below. Up to 8192 blocks, so that 8 rows per
// block — the staged kernel's one row per warp — holds up to 65,536 rows: at 2048 blocks a 16 × 2048 step's norms
// took 16 rows per block and the generic kernel, 5.5 ms per step against 2 × 1.9 at 8 × 2048.)
constexpr int64_t kMaxRowBlocks = 8192;
constexpr int64_t kMinRowsPerBlock = 8;

// The backward's warps per block and their shared partial rows' budget (within the device's 227 KB opt-in).
constexpr int64_t kNormBackwardWarps = 8;
constexpr int64_t kNormBackwardSharedBytes = 160 * 1024;  // as the staged kernel: rpb warps wherever that one applies
constexpr int64_t kNormBackwardStagedBytes = 160 * 1024;  // the staged kernel's rows (8 rows of D ≤ 2560)

int64_t rows_per_block(int64_t rows) {
  return std::max(kMinRowsPerBlock, (rows + kMaxRowBlocks - 1) / kMaxRowBlocks);
}

// LayerNorm statistics of one row (the whole block): mean and 1/√(biased variance + ε), in float64 as ops/norm.cpp
// forms them; shared by the forward and the backward so both see the same numbers.
__device__ void layernorm_stats(const float* xr, int64_t D, float eps, double* red, double& mean, double& rstd) {
  double sum = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) sum += xr[j];
  mean = block_sum(sum, red) / double(D);
  double ss = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const double d = double(xr[j]) - mean;
    ss += d * d;
  }
  ss = block_sum(ss, red);
  rstd = 1.0 / sqrt(ss / double(D) + double(eps));
}

// y = Norm(x)·w (+ b), one block per row, float64 statistics exactly as ops/norm.cpp forms them.
// Cost: reads x twice (three times for LayerNorm) and w, writes y: ~3·rows·D floats of traffic.
__global__ void norm_forward_kernel(const float* x, int64_t rows, int64_t D, const float* w, const float* b,
                                    float eps, float* y) {
  pdl_wait();
  __shared__ double red[kMaxWarps];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    if (!b) {
      double ss = 0;
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) ss += double(xr[j]) * xr[j];
      ss = block_sum(ss, red);
      const float sc = float(1.0 / sqrt(ss / double(D) + double(eps)));
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) yr[j] = xr[j] * sc * w[j];
    } else {
      double mean, rstd;
      layernorm_stats(xr, D, eps, red, mean, rstd);
      const float sc = float(rstd);
      const float m = float(mean);
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) yr[j] = (xr[j] - m) * sc * w[j] + b[j];
    }
  }
}

__device__ __forceinline__ double warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The backward's arithmetic, shared by its three row kernels so that they give the same bits: every per-element
// term in f32 with explicit roundings (no contraction left to the compiler), each lane's row sums in f32 over its
// columns j ≡ lane (mod 32) in increasing j, the lanes' sums added in float64 (a butterfly: every lane gets the same
// bits) and the row constants formed in float64, then rounded to f32 once. (The float64 terms per element it had
// before cost ~9 f32↔f64 conversions per element, a quarter-rate instruction: the 125M step's norm backward ran at
// ~50 % of its traffic floor.) Against the float64 CPU reference: within ~1e-6 (test NormBackwardMatchesCpuAndRepeats).
struct RowGrad {
  float s = 0;     // 1/√(mean x² + ε) (RMSNorm) or 1/√(var + ε) (LayerNorm)
  float c = 0;     // RMSNorm: s³·mean(g·x), g = dy·w
  float mean = 0;  // LayerNorm: the row mean, mean(g) and mean(g·x̂)
  float mg = 0, mgx = 0;
};

// RMSNorm lane sums: ss += x², gx += (dy·w)·x.
__device__ __forceinline__ void rms_lane_sums(float x, float g, float w, float& ss, float& gx) {
  ss = __fmaf_rn(x, x, ss);
  gx = __fmaf_rn(__fmul_rn(g, w), x, gx);
}
__device__ __forceinline__ RowGrad rms_row(float ss, float gx, int64_t D, float eps) {
  const double s = 1.0 / sqrt(warp_sum_d(ss) / double(D) + double(eps));
  RowGrad r;
  r.s = float(s);
  r.c = float(s * s * s * warp_sum_d(gx) / double(D));
  return r;
}
// dx = s·dy·w − c·x; the weight's term dy·x·s.
__device__ __forceinline__ float rms_dx(const RowGrad& r, float x, float g, float w) {
  return __fmaf_rn(__fmul_rn(r.s, g), w, -__fmul_rn(r.c, x));
}
__device__ __forceinline__ float rms_dw_term(const RowGrad& r, float x, float g) {
  return __fmul_rn(__fmul_rn(g, x), r.s);
}
// LayerNorm: the mean from the lanes' sums of x, s from their sums of (x − mean)², mg and mgx from their sums of
// dy·w and (dy·w)·x̂.
__device__ __forceinline__ float ln_mean(float sum, int64_t D) { return float(warp_sum_d(sum) / double(D)); }
__device__ __forceinline__ void ln_var_lane(float x, float mean, float& var) {
  const float d = __fsub_rn(x, mean);
  var = __fmaf_rn(d, d, var);
}
__device__ __forceinline__ float ln_s(float var, int64_t D, float eps) {
  return float(1.0 / sqrt(warp_sum_d(var) / double(D) + double(eps)));
}
__device__ __forceinline__ float ln_xhat(const RowGrad& r, float x) { return __fmul_rn(__fsub_rn(x, r.mean), r.s); }
__device__ __forceinline__ void ln_grad_lane(const RowGrad& r, float x, float g, float w, float& mg, float& mgx) {
  const float gw = __fmul_rn(g, w);
  mg = __fadd_rn(mg, gw);
  mgx = __fmaf_rn(gw, ln_xhat(r, x), mgx);
}
__device__ __forceinline__ void ln_grad_row(RowGrad& r, float mg, float mgx, int64_t D) {
  r.mg = float(warp_sum_d(mg) / double(D));
  r.mgx = float(warp_sum_d(mgx) / double(D));
}
// dx = s·(dy·w − mg − x̂·mgx); the weight's term dy·x̂ (the bias's: dy).
__device__ __forceinline__ float ln_dx(const RowGrad& r, float x, float g, float w) {
  return __fmul_rn(r.s, __fsub_rn(__fsub_rn(__fmul_rn(g, w), r.mg), __fmul_rn(ln_xhat(r, x), r.mgx)));
}
__device__ __forceinline__ float ln_dw_term(const RowGrad& r, float x, float g) { return __fmul_rn(g, ln_xhat(r, x)); }

// dy's element as f32: dy comes in f32, or in bf16 from a product that rounded it (the bf16 mode).
__device__ __forceinline__ float dy_f(float v) { return v; }
__device__ __forceinline__ float dy_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// A row's constants from x and dy (global or staged in shared memory), lane l over the columns j ≡ l (mod 32) in
// increasing j: the generic and staged kernels' shared path (the register kernel walks its arrays in the same order).
template <typename G>
__device__ __forceinline__ RowGrad row_grad(const float* x, const G* g, const float* w, int64_t D, int lane,
                                            bool layer, float eps) {
  RowGrad rg;
  if (!layer) {
    float ss = 0, gx = 0;
    for (int64_t j = lane; j < D; j += 32) rms_lane_sums(x[j], dy_f(g[j]), w[j], ss, gx);
    return rms_row(ss, gx, D, eps);
  }
  float sum = 0, var = 0, mg = 0, mgx = 0;
  for (int64_t j = lane; j < D; j += 32) sum = __fadd_rn(sum, x[j]);
  rg.mean = ln_mean(sum, D);
  for (int64_t j = lane; j < D; j += 32) ln_var_lane(x[j], rg.mean, var);
  rg.s = ln_s(var, D, eps);
  for (int64_t j = lane; j < D; j += 32) ln_grad_lane(rg, x[j], dy_f(g[j]), w[j], mg, mgx);
  ln_grad_row(rg, mg, mgx, D);
  return rg;
}

// dx's element written (added to dx's old value when accumulating), and its bf16 rounding when asked.
__device__ __forceinline__ float dx_out(float v, bool accumulate, float old) { return accumulate ? __fadd_rn(old, v) : v; }

// The block's weight (and bias) partials after a barrier: the warps' shared f32 rows (wsum: (warps, D) weight
// terms, then (warps, D) bias terms when partial_b is given) added in warp order into row blockIdx.x of partial_w
// (and partial_b). Shared by the generic and register row kernels; the staged kernel sums its staged rows alike.
__device__ __forceinline__ void write_block_partials(const float* wsum, int warps, int64_t D, float* partial_w,
                                                     float* partial_b) {
  const bool with_b = partial_b != nullptr;
  float* pw = partial_w + int64_t(blockIdx.x) * D;
  float* pb = with_b ? partial_b + int64_t(blockIdx.x) * D : nullptr;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    float tw = 0, tb = 0;
    for (int i = 0; i < warps; ++i) {
      tw = __fadd_rn(tw, wsum[int64_t(i) * D + j]);
      if (with_b) tb = __fadd_rn(tb, wsum[int64_t(warps + i) * D + j]);
    }
    pw[j] = tw;
    if (pb) pb[j] = tb;
  }
}

// dx for the rows [blk·rpb, (blk+1)·rpb) and this block's partial weight (and bias) sums pw/pb (D floats each). A warp
// per row (rows r0 + w, r0 + w + warps, …), lane l owning the columns j ≡ l (mod 32): the row's sums are warp
// butterflies, with no block barrier per row. Each warp accumulates its rows' weight terms in its own shared row
// (warp-major, D floats per warp; bias terms after all of them), which the block then adds in warp order into the
// block's partial — with rpb ≤ warps, exactly the row order, as one thread summing the block's rows would.
// (A block per row with block-wide sums spent four barriers per row on 3 columns per thread: latency-bound.)
// Cost: reads x, dy twice, w; writes dx; ~5·rows·D floats of traffic plus the partials.
template <typename G>
__global__ void norm_backward_rows_kernel(const float* x, const G* dy, int64_t rows, int64_t D, const float* w,
                                          bool layer, float eps, float* dx, bool accumulate, float* partial_w,
                                          float* partial_b, int64_t rpb, __nv_bfloat16* dx16) {
  pdl_wait();
  extern __shared__ float wsum[];  // (warps, D) weight terms, then (warps, D) bias terms
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
  const bool with_b = partial_b != nullptr;
  float* sw = wsum + int64_t(warp) * D;
  float* sb = with_b ? wsum + int64_t(warps + warp) * D : nullptr;
  for (int64_t j = lane; j < D; j += 32) {
    sw[j] = 0;
    if (sb) sb[j] = 0;
  }
  const int64_t r0 = int64_t(blockIdx.x) * rpb, r1 = r0 + rpb < rows ? r0 + rpb : rows;
  for (int64_t r = r0 + warp; r < r1; r += warps) {
    const float* xr = x + r * D;
    const G* gr = dy + r * D;
    float* dxr = dx + r * D;
    const RowGrad rg = row_grad(xr, gr, w, D, lane, layer, eps);
    for (int64_t j = lane; j < D; j += 32) {
      const float xe = xr[j], ge = dy_f(gr[j]);
      const float v = layer ? ln_dx(rg, xe, ge, w[j]) : rms_dx(rg, xe, ge, w[j]);
      sw[j] = __fadd_rn(sw[j], layer ? ln_dw_term(rg, xe, ge) : rms_dw_term(rg, xe, ge));
      if (sb) sb[j] = __fadd_rn(sb[j], ge);
      const float o = dx_out(v, accumulate, accumulate ? dxr[j] : 0.0f);
      dxr[j] = o;
      if (dx16) dx16[r * D + j] = __float2bfloat16_rn(o);
    }
  }
  __syncthreads();
  write_block_partials(wsum, warps, D, partial_w, partial_b);
}

// norm_backward_rows_kernel with a lane's kV = D/32 columns of x and dy in registers (and dx's, when accumulating):
// a row's loads issued before its stores and read once, the same arithmetic in the same order (the same bits: test
// NormRegisterRowsGiveTheSameBits). (ncu, 125M step: the generic kernel ran at 107 µs per call against a ~65 µs
// memory floor, re-reading x and dy per pass.) Only up to kV = 16 (122 registers): at kV = 24 it takes 254 — the
// compiler keeps each element's products live between the passes — so wider rows use the staged kernel.
template <int kV, typename G>
__global__ void norm_backward_rows_reg_kernel(const float* x, const G* dy, int64_t rows, const float* w,
                                              bool layer, float eps, float* dx, bool accumulate, float* partial_w,
                                              float* partial_b, int64_t rpb, __nv_bfloat16* dx16) {
  pdl_wait();
  constexpr int64_t D = 32 * kV;
  extern __shared__ float wsum[];  // (warps, D) weight terms, then (warps, D) bias terms
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
  const bool with_b = partial_b != nullptr;
  float* sw = wsum + int64_t(warp) * D;
  float* sb = with_b ? wsum + int64_t(warps + warp) * D : nullptr;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    const int j = lane + 32 * i;
    sw[j] = 0;
    if (sb) sb[j] = 0;
  }
  const int64_t r0 = int64_t(blockIdx.x) * rpb, r1 = r0 + rpb < rows ? r0 + rpb : rows;
  for (int64_t r = r0 + warp; r < r1; r += warps) {
    const float* xr = x + r * D;
    const G* gr = dy + r * D;
    float* dxr = dx + r * D;
    float xv[kV], gv[kV], dv[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      xv[i] = xr[lane + 32 * i], gv[i] = dy_f(gr[lane + 32 * i]);
      dv[i] = accumulate ? dxr[lane + 32 * i] : 0.0f;
    }
    RowGrad rg;
    if (!layer) {
      float ss = 0, gx = 0;
#pragma unroll
      for (int i = 0; i < kV; ++i) rms_lane_sums(xv[i], gv[i], w[lane + 32 * i], ss, gx);
      rg = rms_row(ss, gx, D, eps);
    } else {
      float sum = 0, var = 0, mg = 0, mgx = 0;
#pragma unroll
      for (int i = 0; i < kV; ++i) sum = __fadd_rn(sum, xv[i]);
      rg.mean = ln_mean(sum, D);
#pragma unroll
      for (int i = 0; i < kV; ++i) ln_var_lane(xv[i], rg.mean, var);
      rg.s = ln_s(var, D, eps);
#pragma unroll
      for (int i = 0; i < kV; ++i) ln_grad_lane(rg, xv[i], gv[i], w[lane + 32 * i], mg, mgx);
      ln_grad_row(rg, mg, mgx, D);
    }
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = lane + 32 * i;
      const float v = layer ? ln_dx(rg, xv[i], gv[i], w[lane + 32 * i]) : rms_dx(rg, xv[i], gv[i], w[lane + 32 * i]);
      sw[j] = __fadd_rn(sw[j], layer ? ln_dw_term(rg, xv[i], gv[i]) : rms_dw_term(rg, xv[i], gv[i]));
      if (sb) sb[j] = __fadd_rn(sb[j], gv[i]);
      const float o = dx_out(v, accumulate, dv[i]);
      dxr[j] = o;
      if (dx16) dx16[r * D + j] = __float2bfloat16_rn(o);
    }
  }
  __syncthreads();
  write_block_partials(wsum, warps, D, partial_w, partial_b);
}

// norm_backward_rows_kernel for blocks of at most one row per warp (rpb ≤ warps: the 125M step's 8 rows per block),
// with the warp's row of x and dy staged in shared memory by 16-byte loads (a lane's loads of the row all in flight
// before any store: the generic kernel waited on them one column at a time and read x and dy twice), dx written four
// columns at a time, and the block's weight/bias partials summed from the staged rows in row order — which is the
// generic kernel's warp order when each warp has one row. Every sum runs in the generic kernel's order (the row sums
// per lane over j ≡ lane (mod 32), then the warp butterfly) and every element's arithmetic is its expression, so the
// same bits (test NormRegisterRowsGiveTheSameBits). Shared memory: (warps, 2, D) floats, then (warps) RowGrads.
// D % 4 == 0 and 16-byte aligned x, dy, dx (the launcher checks). (The register kernel spilled from D = 768 on while
// its terms were float64.) (At most 80 registers: three blocks of eight warps per SM.)
template <typename G>
__global__ void __launch_bounds__(256, 3) norm_backward_rows_staged_kernel(const float* x, const G* dy, int64_t rows, int64_t D,
                                                 const float* w, bool layer, float eps, float* dx, bool accumulate,
                                                 float* partial_w, float* partial_b, int64_t rpb,
                                                 __nv_bfloat16* dx16) {
  pdl_wait();
  extern __shared__ float4 staged4[];
  float* staged = reinterpret_cast<float*>(staged4);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
  RowGrad* stat = reinterpret_cast<RowGrad*>(staged + 2 * int64_t(warps) * D);
  const int64_t r0 = int64_t(blockIdx.x) * rpb, nr = r0 + rpb < rows ? rpb : rows - r0, D4 = D / 4;
  if (warp < nr) {
    const int64_t r = r0 + warp;
    float *xs = staged + 2 * int64_t(warp) * D, *gs = xs + D;
    const float4* x4 = reinterpret_cast<const float4*>(x + r * D);
    constexpr int kAhead = 4;  // 4 + 4 float4 loads in flight per lane (8 + 8 took the registers of a third block)
    if constexpr (std::is_same_v<G, float>) {
      for (int64_t i0 = lane; i0 < D4; i0 += 32 * kAhead) {
        float4 a[kAhead], b[kAhead];
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
          const int64_t i = i0 + 32 * u;
          if (i < D4) a[u] = x4[i], b[u] = reinterpret_cast<const float4*>(dy + r * D)[i];
        }
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
          const int64_t i = i0 + 32 * u;
          if (i < D4) reinterpret_cast<float4*>(xs)[i] = a[u], reinterpret_cast<float4*>(gs)[i] = b[u];
        }
      }
    } else {
      // dy in bf16 (D % 8 == 0): 16-byte loads of 8 values (8-byte ones ran 67 → 73 µs per 125M call), kAhead / 2
      // per lane covering the kAhead float4 pieces of x that the lanes load in the same round.
      const uint4* g8 = reinterpret_cast<const uint4*>(dy + r * D);
      for (int64_t c0 = 0; c0 < D4; c0 += 32 * kAhead) {
        float4 a[kAhead];
        uint4 q[kAhead / 2];
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
          const int64_t i = c0 + lane + 32 * u;
          if (i < D4) a[u] = x4[i];
        }
#pragma unroll
        for (int v = 0; v < kAhead / 2; ++v) {
          const int64_t k = c0 / 2 + lane + 32 * v;  // 8-value piece k: float4 pieces 2k and 2k + 1
          if (2 * k < D4) q[v] = g8[k];
        }
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
          const int64_t i = c0 + lane + 32 * u;
          if (i < D4) reinterpret_cast<float4*>(xs)[i] = a[u];
        }
#pragma unroll
        for (int v = 0; v < kAhead / 2; ++v) {
          const int64_t k = c0 / 2 + lane + 32 * v;
          if (2 * k >= D4) continue;
          const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&q[v]);
          const float2 e0 = __bfloat1622float2(h[0]), e1 = __bfloat1622float2(h[1]);
          const float2 e2 = __bfloat1622float2(h[2]), e3 = __bfloat1622float2(h[3]);
          reinterpret_cast<float4*>(gs)[2 * k] = make_float4(e0.x, e0.y, e1.x, e1.y);
          reinterpret_cast<float4*>(gs)[2 * k + 1] = make_float4(e2.x, e2.y, e3.x, e3.y);
        }
      }
    }
    __syncwarp();
    const RowGrad rg = row_grad(xs, gs, w, D, lane, layer, eps);
    if (lane == 0) stat[warp] = rg;
    // dx, four columns per lane and step (each element's expression as in the generic kernel).
    float4* dx4 = reinterpret_cast<float4*>(dx + r * D);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    const bool w_aligned = (reinterpret_cast<uintptr_t>(w) & 15) == 0;
    // kDx of the lane's float4 pieces at a time, their loads (dx when accumulating, w) before the first store: one
    // piece at a time, each dx load waited behind the previous piece's store (ncu, 125M: 28 % of the stall samples
    // on its first use).
    constexpr int kDx = 3;
    for (int64_t i0 = lane; i0 < D4; i0 += 32 * kDx) {
      float4 d0[kDx], wv[kDx];
#pragma unroll
      for (int u = 0; u < kDx; ++u) {
        const int64_t i = i0 + 32 * u;
        d0[u] = accumulate && i < D4 ? dx4[i] : make_float4(0, 0, 0, 0);
        wv[u] = i >= D4     ? make_float4(0, 0, 0, 0)
                : w_aligned ? w4[i]
                            : make_float4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
      }
#pragma unroll
      for (int u = 0; u < kDx; ++u) {
        const int64_t i = i0 + 32 * u;
        if (i >= D4) break;
        const float4 xv = reinterpret_cast<const float4*>(xs)[i], gv = reinterpret_cast<const float4*>(gs)[i];
        const auto one = [&](float xe, float ge, float we, float de) {
          return dx_out(layer ? ln_dx(rg, xe, ge, we) : rms_dx(rg, xe, ge, we), accumulate, de);
        };
        const float4 o = make_float4(one(xv.x, gv.x, wv[u].x, d0[u].x), one(xv.y, gv.y, wv[u].y, d0[u].y),
                                     one(xv.z, gv.z, wv[u].z, d0[u].z), one(xv.w, gv.w, wv[u].w, d0[u].w));
        dx4[i] = o;
        if (dx16) {
          __nv_bfloat162* o16 = reinterpret_cast<__nv_bfloat162*>(dx16 + r * D + 4 * i);
          o16[0] = __floats2bfloat162_rn(o.x, o.y), o16[1] = __floats2bfloat162_rn(o.z, o.w);
        }
      }
    }
  }
  __syncthreads();
  // The block's partials from the staged rows, in row order (the generic kernel's per-warp rows, summed in warp order).
  const bool with_b = partial_b != nullptr;
  float* pw = partial_w + int64_t(blockIdx.x) * D;
  float* pb = with_b ? partial_b + int64_t(blockIdx.x) * D : nullptr;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    float tw = 0, tb = 0;
    for (int64_t i = 0; i < nr; ++i) {
      const float xe = staged[2 * i * D + j], ge = staged[(2 * i + 1) * D + j];
      tw = __fadd_rn(tw, layer ? ln_dw_term(stat[i], xe, ge) : rms_dw_term(stat[i], xe, ge));
      if (layer) tb = __fadd_rn(tb, ge);
    }
    pw[j] = tw;
    if (pb) pb[j] = tb;
  }
}

// dw[j] += Σ_blk pw[blk, j] (and db) in float64, the deterministic second stage: a block of 32 warps per 32 columns,
// lane = column, warp i adding the partial rows i, i + 32, … in order, then the warps' totals added in warp order
// (a fixed order that depends on nblocks only). A warp's loads are 32 adjacent floats of one partial row.
__device__ __forceinline__ void norm_backward_sum_columns(const float* partial_w, const float* partial_b,
                                                          int64_t nblocks, int64_t D, float* dw, float* db,
                                                          int64_t column_block) {
  __shared__ double tot[2][32][33];
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int64_t j = column_block * 32 + lane;
  double sw = 0, sb = 0;
  if (j < D) {
#pragma unroll 8
    for (int64_t blk = warp; blk < nblocks; blk += 32) {
      sw += partial_w[blk * D + j];
      if (db) sb += partial_b[blk * D + j];
    }
  }
  tot[0][warp][lane] = sw, tot[1][warp][lane] = sb;
  __syncthreads();
  if (warp == 0 && j < D) {
    double tw = 0, tb = 0;
    for (int i = 0; i < 32; ++i) tw += tot[0][i][lane], tb += tot[1][i][lane];
    dw[j] += float(tw);
    if (db) db[j] += float(tb);
  }
}

__global__ void __launch_bounds__(1024) norm_backward_sum_kernel(const float* partial_w, const float* partial_b,
                                                                 int64_t nblocks, int64_t D, float* dw, float* db) {
  pdl_wait();
  norm_backward_sum_columns(partial_w, partial_b, nblocks, D, dw, db, blockIdx.x);
}

// Queued sums in one launch: job i owns the blocks [first[i], first[i + 1]), one per 32 of its columns, each summing
// as norm_backward_sum_kernel's block does (the same bits).
constexpr int kNormSumJobsPerLaunch = 48;
struct NormSumBatch {
  NormSumJob job[kNormSumJobsPerLaunch];
  int first[kNormSumJobsPerLaunch + 1];
  int count;
};

__global__ void __launch_bounds__(1024) norm_backward_sum_batch_kernel(const NormSumBatch batch) {
  pdl_wait();
  int i = 0;
  while (i + 1 < batch.count && int(blockIdx.x) >= batch.first[i + 1]) ++i;
  const NormSumJob& jb = batch.job[i];
  norm_backward_sum_columns(jb.pw, jb.pb, jb.nblocks, jb.D, jb.dw, jb.db, int64_t(blockIdx.x) - batch.first[i]);
}

// A warp per row: r = prev + hidden (prev alone when hidden is null) into res_out, then y = Norm(r)·w (+ b) with the
// float64 statistics of norm_forward_kernel (summed by the warp's butterfly instead of the block's). Each lane owns
// the columns j ≡ lane (mod 32) in every pass, so res_out may alias prev and y may alias hidden. Traffic: 2 reads and
// 2 writes of rows·D floats (the separate add, copy of the residual and norm moved 4 reads and 4 writes).
__global__ void residual_norm_forward_kernel(const float* prev, const float* hidden, int64_t rows, int64_t D,
                                             const float* w, const float* b, float eps, float* res_out, float* y,
                                             __nv_bfloat16* y16, const __nv_bfloat16* hidden16) {
  pdl_wait();
  const int lane = threadIdx.x % 32;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += int64_t(gridDim.x) * blockDim.x / 32) {
    const float* pr = prev + r * D;
    const float* hr = hidden ? hidden + r * D : nullptr;
    const __nv_bfloat16* hr16 = hidden16 ? hidden16 + r * D : nullptr;
    float* xr = res_out + r * D;
    float* yr = y ? y + r * D : nullptr;
    __nv_bfloat16* yr16 = y16 ? y16 + r * D : nullptr;
    // One output element: f32 and/or its bf16 rounding (the bf16 mode's product operand, rounded once here).
    const auto put = [&](int64_t j, float v) {
      if (yr) yr[j] = v;
      if (yr16) yr16[j] = __float2bfloat16_rn(v);
    };
    double sum = 0, ss = 0;
    for (int64_t j = lane; j < D; j += 32) {
      const float v = hr ? pr[j] + hr[j] : hr16 ? pr[j] + __bfloat162float(hr16[j]) : pr[j];
      xr[j] = v;
      sum += v;
      ss += double(v) * v;
    }
    if (!b) {
      const float sc = float(1.0 / sqrt(warp_sum_d(ss) / double(D) + double(eps)));
      for (int64_t j = lane; j < D; j += 32) put(j, xr[j] * sc * w[j]);
    } else {
      const double mean = warp_sum_d(sum) / double(D);
      double var = 0;
      for (int64_t j = lane; j < D; j += 32) {
        const double dv = double(xr[j]) - mean;
        var += dv * dv;
      }
      const float sc = float(1.0 / sqrt(warp_sum_d(var) / double(D) + double(eps)));
      const float m = float(mean);
      for (int64_t j = lane; j < D; j += 32) put(j, (xr[j] - m) * sc * w[j] + b[j]);
    }
  }
}

// residual_norm_forward_kernel with a lane's kV = D/32 columns held in registers: every load of a row (prev and hidden)
// issued before any store, no re-read of the residual it wrote, the same arithmetic in the same order (the same bits:
// test NormRegisterRowsGiveTheSameBits). (ncu, 125M step: the generic kernel ran at 85 µs per call against a ~60 µs
// memory floor, each lane's loads one at a time and the residual read back after its store.)
template <int kV>
__global__ void residual_norm_forward_rows_kernel(const float* prev, const float* hidden, int64_t rows, const float* w,
                                                  const float* b, float eps, float* res_out, float* y,
                                                  __nv_bfloat16* y16, const __nv_bfloat16* hidden16) {
  pdl_wait();
  constexpr int64_t D = 32 * kV;
  const int lane = threadIdx.x % 32;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += int64_t(gridDim.x) * blockDim.x / 32) {
    const float* pr = prev + r * D;
    const float* hr = hidden ? hidden + r * D : nullptr;
    float v[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) v[i] = pr[lane + 32 * i];
    if (hr) {
      float h[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) h[i] = hr[lane + 32 * i];
#pragma unroll
      for (int i = 0; i < kV; ++i) v[i] = v[i] + h[i];
    } else if (hidden16) {
      const __nv_bfloat16* hr16 = hidden16 + r * D;
      __nv_bfloat16 h[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) h[i] = hr16[lane + 32 * i];
#pragma unroll
      for (int i = 0; i < kV; ++i) v[i] = v[i] + __bfloat162float(h[i]);
    }
    float* xr = res_out + r * D;
    double sum = 0, ss = 0;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      xr[lane + 32 * i] = v[i];
      sum += v[i];
      ss += double(v[i]) * v[i];
    }
    float* yr = y ? y + r * D : nullptr;
    __nv_bfloat16* yr16 = y16 ? y16 + r * D : nullptr;
    const auto put = [&](int i, float o) {
      if (yr) yr[lane + 32 * i] = o;
      if (yr16) yr16[lane + 32 * i] = __float2bfloat16_rn(o);
    };
    if (!b) {
      const float sc = float(1.0 / sqrt(warp_sum_d(ss) / double(D) + double(eps)));
#pragma unroll
      for (int i = 0; i < kV; ++i) put(i, v[i] * sc * w[lane + 32 * i]);
    } else {
      const double mean = warp_sum_d(sum) / double(D);
      double var = 0;
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const double dv = double(v[i]) - mean;
        var += dv * dv;
      }
      const float sc = float(1.0 / sqrt(warp_sum_d(var) / double(D) + double(eps)));
      const float m = float(mean);
#pragma unroll
      for (int i = 0; i < kV; ++i) put(i, (v[i] - m) * sc * w[lane + 32 * i] + b[lane + 32 * i]);
    }
  }
}

// residual_norm_forward_rows_kernel for the training step's RMSNorm: the block's output in bf16 (hidden16, or none)
// and the normalised rows only in bf16 (y16), fixed at compile time, so that no mean is summed and no per-element
// branch is taken. The same expressions in the same order: the same bits (test NormBfloatInputsGiveTheUpcastBits).
// (ncu, 125M: the general instance held 106 registers, 16 warps per SM, at 2.8 TB/s.)
template <int kV, bool kHidden>
__global__ void __launch_bounds__(256, 4) residual_rmsnorm_rows16_kernel(const float* prev, int64_t rows,
                                                                          const float* w, float eps, float* res_out,
                                                                          __nv_bfloat16* y16,
                                                                          const __nv_bfloat16* hidden16) {
  pdl_wait();
  constexpr int64_t D = 32 * kV;
  const int lane = threadIdx.x % 32;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += int64_t(gridDim.x) * blockDim.x / 32) {
    const float* pr = prev + r * D + lane;
    float v[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) v[i] = pr[32 * i];
    if constexpr (kHidden) {
      const __nv_bfloat16* hr16 = hidden16 + r * D + lane;
      __nv_bfloat16 h[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) h[i] = hr16[32 * i];
#pragma unroll
      for (int i = 0; i < kV; ++i) v[i] = v[i] + __bfloat162float(h[i]);
    }
    float* xr = res_out + r * D + lane;
    double ss = 0;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      xr[32 * i] = v[i];
      ss += double(v[i]) * v[i];
    }
    __nv_bfloat16* yr16 = y16 + r * D + lane;
    const float sc = float(1.0 / sqrt(warp_sum_d(ss) / double(D) + double(eps)));
#pragma unroll
    for (int i = 0; i < kV; ++i) yr16[32 * i] = __float2bfloat16_rn(v[i] * sc * w[lane + 32 * i]);
  }
}

__global__ void add_inplace_kernel(float* y, const float* x, int64_t n) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

bool g_register_rows = true;  // set_norm_register_rows

// MAMBA3_TRAIN_RMS16_ROWS, read once per process: residual_rmsnorm_rows16_kernel where it applies ("1", the default) or
// the general register-rows kernel ("0"); the same bits.
bool rms16_rows_enabled() {
  static const bool on = env_choice("MAMBA3_TRAIN_RMS16_ROWS", {"1", "0"}) != "0";
  return on;
}
// MAMBA3_TRAIN_NORM_STAGED, read once: the staged backward rows kernel where it applies ("1", the default) or not ("0").
bool staged_rows_enabled() {
  static const bool on = env_choice("MAMBA3_TRAIN_NORM_STAGED", {"1", "0"}) != "0";
  return on && g_register_rows;
}

// kernel<kV> for D = 32·kV with kV among Vs (true), else nothing (false).
template <template <int> class Pick, int... Vs, typename Launch>
bool pick_register_kernel(int64_t D, Launch&& launch) {
  if (!g_register_rows || D % 32 != 0) return false;
  return ((D / 32 == Vs ? (launch(Pick<Vs>::kernel), true) : false) || ...);
}

template <int kV>
struct ForwardRows {
  static constexpr auto kernel = residual_norm_forward_rows_kernel<kV>;
};
template <int kV>
struct BackwardRows {
  static constexpr auto kernel = norm_backward_rows_reg_kernel<kV, float>;
};
template <int kV>
struct BackwardRows16 {
  static constexpr auto kernel = norm_backward_rows_reg_kernel<kV, __nv_bfloat16>;
};

}  // namespace

void set_norm_register_rows(bool on) { g_register_rows = on; }

void norm_forward_gpu(cudaStream_t s, const float* x, int64_t rows, int64_t D, const float* w, const float* b,
                      float eps, float* y) {
  if (rows <= 0 || D <= 0) return;
  const int threads = threads_for(D);
  launch_train(norm_forward_kernel, unsigned(std::min<int64_t>(rows, 1 << 20)), threads, 0, s, x, rows, D, w, b, eps,
               y);
  MAMBA3_LAUNCH_CHECK();
}

namespace {

template <typename G>
void norm_backward_typed(cudaStream_t s, const float* x, const G* dy, int64_t rows, int64_t D, const float* w,
                         const float* b_or_null, float eps, float* dx, bool accumulate_dx, float* dw, float* db_or_null,
                         NormGradScratch& scratch, uint16_t* dx16) {
  const int64_t rpb = rows_per_block(rows), nblocks = (rows + rpb - 1) / rpb;
  const bool with_db = db_or_null != nullptr;
  const size_t floats = size_t(nblocks * D) * (with_db ? 2 : 1);
  // Deferred: this norm's partials after the queued ones' (the queue flushed first where they would not fit; a
  // buffer that must grow is regrown only with nothing queued, since regrowing drops its contents).
  size_t at = 0;
  if (scratch.defer) {
    const size_t budget = std::max(scratch.defer_budget_bytes / sizeof(float), floats);
    const bool grow = scratch.partial.bytes() < (scratch.used_floats + floats) * sizeof(float);
    // (A queued sum into the same dw or db would race with this one's in the batch.)
    bool flush = grow || scratch.used_floats + floats > budget ||
                 scratch.queued.size() >= size_t(kNormSumJobsPerLaunch);
    for (const NormSumJob& q : scratch.queued) flush = flush || q.dw == dw || (db_or_null && q.db == db_or_null);
    if (flush) flush_norm_grad_sums(s, scratch);
    if (grow) scratch.partial.reserve(std::min(budget, floats * 64) * sizeof(float));
    at = scratch.used_floats;
  } else {
    scratch.partial.reserve(floats * sizeof(float));
  }
  float* pw = scratch.partial.as<float>() + at;
  float* pb = with_db ? pw + nblocks * D : nullptr;
  // Warps per block: one per row of the block (rpb), at most 8, and as many as the warps' shared partial rows allow.
  const int64_t row_bytes = D * int64_t(sizeof(float)) * (with_db ? 2 : 1);
  const int warps = int(std::clamp<int64_t>(std::min<int64_t>(rpb, kNormBackwardWarps), 1,
                                            std::max<int64_t>(1, kNormBackwardSharedBytes / row_bytes)));
  const size_t shared = size_t(warps * row_bytes);
  MAMBA3_CHECK(shared <= size_t(kNormBackwardSharedBytes), "norm_backward_gpu: width {} too large", D);
  const auto launch = [&](auto kernel, auto... width) {
    if (shared > 48 * 1024)
      MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
    launch_train(kernel, unsigned(nblocks), warps * 32, shared, s, x, dy, rows, width..., w, b_or_null != nullptr, eps,
                 dx, accumulate_dx, pw, pb, rpb, reinterpret_cast<__nv_bfloat16*>(dx16));
    MAMBA3_LAUNCH_CHECK();
  };
  // Widths 256 and 512 with a lane's columns in registers (see the kernel for why no wider); wider ones staged in
  // shared memory where each warp has one row and the staged rows fit.
  const int staged_warps = int(rpb);
  const size_t staged_bytes = size_t(staged_warps) * (2 * size_t(D) * sizeof(float) + sizeof(RowGrad));
  const auto pick_rows = [&] {
    if constexpr (std::is_same_v<G, float>)
      return pick_register_kernel<BackwardRows, 8, 16>(D, [&](auto kernel) { launch(kernel); });
    else
      return pick_register_kernel<BackwardRows16, 8, 16>(D, [&](auto kernel) { launch(kernel); });
  };
  if (pick_rows()) {
  } else if (staged_rows_enabled() && D % (std::is_same_v<G, float> ? 4 : 8) == 0 && rpb <= kNormBackwardWarps &&
             aligned16(x) && aligned16(dy) &&
             aligned16(dx) && staged_bytes <= size_t(kNormBackwardStagedBytes)) {
    auto* kernel = norm_backward_rows_staged_kernel<G>;
    if (staged_bytes > 48 * 1024)
      MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(staged_bytes)));
    // All of the SM's shared memory for it (the default split left room for two blocks of D = 768).
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           int(cudaSharedmemCarveoutMaxShared)));
    launch_train(kernel, unsigned(nblocks), staged_warps * 32, staged_bytes, s, x, dy, rows, D, w, b_or_null != nullptr,
                 eps, dx, accumulate_dx, pw, pb, rpb, reinterpret_cast<__nv_bfloat16*>(dx16));
    MAMBA3_LAUNCH_CHECK();
  } else {
    launch(norm_backward_rows_kernel<G>, D);
  }
  if (scratch.defer) {
    scratch.queued.push_back({pw, pb, nblocks, D, dw, db_or_null});
    scratch.used_floats += floats;
    return;
  }
  launch_train(norm_backward_sum_kernel, unsigned((D + 31) / 32), 1024, 0, s, pw, pb, nblocks, D, dw, db_or_null);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace

void flush_norm_grad_sums(cudaStream_t s, NormGradScratch& scratch) {
  for (size_t from = 0; from < scratch.queued.size(); from += kNormSumJobsPerLaunch) {
    NormSumBatch batch{};
    batch.count = int(std::min<size_t>(kNormSumJobsPerLaunch, scratch.queued.size() - from));
    int64_t blocks = 0;
    for (int i = 0; i < batch.count; ++i) {
      batch.job[i] = scratch.queued[from + size_t(i)];
      batch.first[i] = int(blocks);
      blocks += (batch.job[i].D + 31) / 32;
    }
    batch.first[batch.count] = int(blocks);
    MAMBA3_CHECK(blocks <= 0x7fffffff, "flush_norm_grad_sums: {} blocks exceed the grid", blocks);
    launch_train(norm_backward_sum_batch_kernel, unsigned(blocks), 1024, 0, s, batch);
    MAMBA3_LAUNCH_CHECK();
  }
  scratch.queued.clear();
  scratch.used_floats = 0;
}

bool norm_sums_deferred_by_default() {
  static const bool on = env_choice("MAMBA3_TRAIN_NORM_SUMS_DEFERRED", {"1", "0"}) != "0";
  return on;
}

void norm_backward_gpu(cudaStream_t s, const float* x, const float* dy, int64_t rows, int64_t D, const float* w,
                       const float* b_or_null, float eps, float* dx, bool accumulate_dx, float* dw, float* db_or_null,
                       NormGradScratch& scratch, uint16_t* dx16, const uint16_t* dy16) {
  if (rows <= 0 || D <= 0) return;
  MAMBA3_CHECK(b_or_null || !db_or_null, "norm_backward_gpu: a bias gradient asked of an RMSNorm (no bias)");
  MAMBA3_CHECK((dy != nullptr) != (dy16 != nullptr), "norm_backward_gpu: dy must be given once, in f32 or in bf16");
  if (dy16)
    norm_backward_typed(s, x, reinterpret_cast<const __nv_bfloat16*>(dy16), rows, D, w, b_or_null, eps, dx,
                        accumulate_dx, dw, db_or_null, scratch, dx16);
  else
    norm_backward_typed(s, x, dy, rows, D, w, b_or_null, eps, dx, accumulate_dx, dw, db_or_null, scratch, dx16);
}

void residual_norm_forward_gpu(cudaStream_t s, const float* prev, const float* hidden, int64_t rows, int64_t D,
                               const float* w, const float* b, float eps, float* res_out, float* y, uint16_t* y16,
                               const uint16_t* hidden16) {
  if (rows <= 0 || D <= 0) return;
  MAMBA3_CHECK(y || y16, "residual_norm_forward_gpu: no output (y and y16 both null)");
  MAMBA3_CHECK(!(hidden && hidden16), "residual_norm_forward_gpu: hidden given both in f32 and in bf16");
  __nv_bfloat16* out16 = reinterpret_cast<__nv_bfloat16*>(y16);
  const __nv_bfloat16* in16 = reinterpret_cast<const __nv_bfloat16*>(hidden16);
  // The training step's RMSNorm with bf16 rows in and out (D 512, 768, 1024 with a lane's columns in registers).
  if (g_register_rows && !b && !y && !hidden && (D == 512 || D == 768 || D == 1024) && rms16_rows_enabled()) {
    const auto go = [&](auto kernel) {
      launch_train(kernel, grid_for(rows * 32, 256), 256, 0, s, prev, rows, w, eps, res_out, out16, in16);
    };
    if (D == 768) in16 ? go(residual_rmsnorm_rows16_kernel<24, true>) : go(residual_rmsnorm_rows16_kernel<24, false>);
    else if (D == 512) in16 ? go(residual_rmsnorm_rows16_kernel<16, true>) : go(residual_rmsnorm_rows16_kernel<16, false>);
    else in16 ? go(residual_rmsnorm_rows16_kernel<32, true>) : go(residual_rmsnorm_rows16_kernel<32, false>);
    MAMBA3_LAUNCH_CHECK();
    return;
  }
  // Widths up to 2048 with a lane's columns in registers.
  if (!pick_register_kernel<ForwardRows, 8, 16, 24, 32, 48, 64>(D, [&](auto kernel) {
        launch_train(kernel, grid_for(rows * 32, 256), 256, 0, s, prev, hidden, rows, w, b, eps, res_out, y, out16,
                     in16);
      }))
    launch_train(residual_norm_forward_kernel, grid_for(rows * 32, 256), 256, 0, s, prev, hidden, rows, D, w, b, eps,
                 res_out, y, out16, in16);
  MAMBA3_LAUNCH_CHECK();
}

void add_inplace_gpu(cudaStream_t s, float* y, const float* x, int64_t n) {
  if (n <= 0) return;
  launch_train(add_inplace_kernel, grid_for(n, 256), 256, 0, s, y, x, n);
  MAMBA3_LAUNCH_CHECK();
}

void copy_gpu(cudaStream_t s, float* dst, const float* src, int64_t n) {
  if (n <= 0 || dst == src) return;
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, s));
}

}  // namespace mamba3::cuda
