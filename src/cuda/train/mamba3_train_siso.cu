// SISO instances of the batched path's elementwise chunk kernels (mamba3_train_batched_common.cuh): the build, the
// output stage's backward and the rotation backward with compile-time shapes, the generic kernels' arithmetic and
// sums in the same order, fewer instructions (ncu found the generic ones issue-bound on SISO shapes, 2026-12-02).
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/pdl.h"
#include "cuda/train/chunk_core_launch.cuh"
#include "cuda/train/mamba3_train_batched_common.cuh"
#include "cuda/train/mma_bf16.cuh"

namespace mamba3::cuda::train_detail::batched {

namespace {

// The SISO build's shapes and alignment (launch_build_siso): where it wrote q and k, the rotation backward may form
// them again from zx instead of reading them.
bool build_siso_applies(const BatchedParams& p) {
  const MixerDims& d = p.d;
  return p.siso_kernels && p.bf16 && !d.mimo && p.rows == p.T && p.rows <= 64 && (d.N == 32 || d.N == 64 || d.N == 128) &&
         (d.P == 32 || d.P == 64) && d.din % 4 == 0 && d.off_B % 4 == 0 && d.off_C % 4 == 0 && d.off_x % 4 == 0 &&
         d.G >= 1 && d.H % d.G == 0;
}

// build_chunk_scalars' values for every chunk, a warp per (sequence, head, chunk): lane l takes tokens l and l + 32
// (T ≤ 64), and every lane walks Λ's sum in token order with the same fused multiply-adds (the factors by shuffles,
// ahead of the chain), keeping its own tokens' partial sums. The same expressions (chunk_token_scalars, expf) in the
// same order: the same bits, without the build's barriers (its fast path reads w from p.wv).
__global__ void __launch_bounds__(kThreads) chunk_scalars_kernel(const BatchedParams p) {
  pdl_wait();
  const int64_t chunk = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (chunk >= int64_t(p.d.B) * p.d.H * p.nc) return;  // (whole warps)
  const ChunkIndex ix(p, chunk);
  const int lane = threadIdx.x % 32, T = p.T;
  const int64_t cs0 = chunk * T;
  float a[2], dt[2], scale[2], lam_sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tl = lane + 32 * i;
    float gam = 0.0f;
    a[i] = dt[i] = scale[i] = 0.0f;
    if (tl < ix.Tc) chunk_token_scalars(p, ix, tl, a[i], dt[i], gam, scale[i]);
    if (tl < T) p.gam[cs0 + tl] = gam, p.scale[cs0 + tl] = scale[i];
  }
  float run = 0.0f;
#pragma unroll
  for (int tl = 0; tl < 64; ++tl) {
    const float at = __shfl_sync(0xffffffffu, a[tl / 32], tl % 32), dtt = __shfl_sync(0xffffffffu, dt[tl / 32], tl % 32);
    if (tl < T) run = __fmaf_rn(at, dtt, run);
    if (lane == tl % 32) lam_sum[tl / 32] = run;
  }
  if (lane == 0) p.decay[chunk] = expf(run);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tl = lane + 32 * i;
    if (tl >= T) continue;
    p.Lam[cs0 + tl] = lam_sum[i], p.eL[cs0 + tl] = expf(lam_sum[i]);
    p.wv[cs0 + tl] = __fmul_rn(expf(__fsub_rn(run, lam_sum[i])), scale[i]);
  }
}

// The SISO build for the cores' shapes in the bf16 mode (zx rows 16-byte aligned): the generic kernel's arithmetic,
// but each lane takes kE = max(N/32, 2) consecutive elements of a row's q and k (kE/2 rotary pairs, the head's biases
// held in registers) and P/32 channels of v with vector loads and stores; two rows per warp at a time, every load
// first. (ncu: the generic kernel was issue-bound, 64 % SM and 25 % DRAM, on per-element index arithmetic.)
// kX16: x from the in_proj's bf16 copy (p.zx16), chosen at compile time (as a runtime branch the kernel took 218 µs
// per 125M call against 205 with f32 x; ncu, H200).
template <int N, int P, bool kX16>
__global__ void __launch_bounds__(kThreads, 4) batched_build_siso_kernel(const BatchedParams p) {
  pdl_wait();
  constexpr int kE = N >= 64 ? N / 32 : 2, kLanes = N / kE, kC = P / 32, kRowsAhead = 2;
  using bf16 = __nv_bfloat16;
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  extern __shared__ float sm[];
  const int g = ix.h / (d.H / d.G), warp = threadIdx.x / 32, lane = threadIdx.x % 32, n0 = lane * kE;
  const bool qk_lane = lane < kLanes;
  float bq[kE], bk[kE];
#pragma unroll
  for (int e = 0; e < kE; ++e)
    bq[e] = qk_lane ? p.C_bias[int64_t(ix.h) * N + n0 + e] : 0.0f, bk[e] = qk_lane ? p.B_bias[int64_t(ix.h) * N + n0 + e] : 0.0f;
  const float* wts = build_chunk_scalars(p, ix, sm);  // w per token
  for (int j0 = warp; j0 < p.T; j0 += kRowsAhead * kWarps) {
    float c[kRowsAhead][kE], k[kRowsAhead][kE], cs[kRowsAhead][kE / 2][2], x[kRowsAhead][kC];
#pragma unroll
    for (int a = 0; a < kRowsAhead; ++a) {
      const int tl = j0 + a * kWarps;
      const bool real = tl < ix.Tc;
      const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + min(tl, ix.Tc - 1);
      const float* z = p.zx + tok * d.din;
#pragma unroll
      for (int e = 0; e < kE; ++e) c[a][e] = k[a][e] = 0.0f;
      if (real && qk_lane) {
        const float* zc = z + d.off_C + int64_t(g) * N + n0;
        const float* zb = z + d.off_B + int64_t(g) * N + n0;
        if constexpr (kE == 4) {
          const float4 cv = *reinterpret_cast<const float4*>(zc), kv = *reinterpret_cast<const float4*>(zb);
          c[a][0] = cv.x, c[a][1] = cv.y, c[a][2] = cv.z, c[a][3] = cv.w;
          k[a][0] = kv.x, k[a][1] = kv.y, k[a][2] = kv.z, k[a][3] = kv.w;
        } else {
          const float2 cv = *reinterpret_cast<const float2*>(zc), kv = *reinterpret_cast<const float2*>(zb);
          c[a][0] = cv.x, c[a][1] = cv.y, k[a][0] = kv.x, k[a][1] = kv.y;
        }
      }
#pragma unroll
      for (int m = 0; m < kE / 2; ++m) {
        const int u = n0 / 2 + m;
        const float2 r = real && qk_lane && u < d.S
                             ? rotary_cos_sin(angle_at(p.phi, p.phi_code, (ix.bh * d.L + ix.c0 + tl) * d.S + u))
                             : make_float2(1.0f, 0.0f);
        cs[a][m][0] = r.x, cs[a][m][1] = r.y;
      }
      const int64_t xcol = d.off_x + int64_t(ix.h) * P + lane * kC;
      if constexpr (kX16) {  // (the in_proj's bf16 x: its row of 2·d_inner bf16 is 4-byte aligned for a pair)
        const bf16* xr = reinterpret_cast<const bf16*>(p.zx16) + tok * 2 * d.d_inner + xcol;
        if constexpr (kC == 2) {
          const float2 xv = real ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xr))
                                 : make_float2(0.0f, 0.0f);
          x[a][0] = xv.x, x[a][1] = xv.y;
        } else {
          x[a][0] = real ? __bfloat162float(xr[0]) : 0.0f;
        }
      } else {
        const float* xr = z + xcol;
        if constexpr (kC == 2) {
          const float2 xv = real ? *reinterpret_cast<const float2*>(xr) : make_float2(0.0f, 0.0f);
          x[a][0] = xv.x, x[a][1] = xv.y;
        } else {
          x[a][0] = real ? xr[0] : 0.0f;
        }
      }
    }
#pragma unroll
    for (int a = 0; a < kRowsAhead; ++a) {
      const int tl = j0 + a * kWarps;
      if (tl >= p.T) break;
      const bool real = tl < ix.Tc;
      const int64_t row = ix.chunk * p.rows + tl;
      if (qk_lane) {
        __nv_bfloat162 qo[kE / 2], ko[kE / 2];
#pragma unroll
        for (int m = 0; m < kE / 2; ++m) {
          const int u = n0 / 2 + m;
          qo[m] = ko[m] = __floats2bfloat162_rn(0.0f, 0.0f);  // padding rows: zeros
          if (real) {
            const float cv = cs[a][m][0], sv = cs[a][m][1];
            qo[m] = rotated_pair(c[a][2 * m], c[a][2 * m + 1], bq[2 * m], bq[2 * m + 1], cv, sv, u < d.S);
            ko[m] = rotated_pair(k[a][2 * m], k[a][2 * m + 1], bk[2 * m], bk[2 * m + 1], cv, sv, u < d.S);
          }
        }
        bf16* qd = static_cast<bf16*>(p.Q) + row * N + n0;
        bf16* kd = static_cast<bf16*>(p.K) + row * N + n0;
        if constexpr (kE == 4) {
          *reinterpret_cast<uint2*>(qd) = *reinterpret_cast<const uint2*>(qo);
          *reinterpret_cast<uint2*>(kd) = *reinterpret_cast<const uint2*>(ko);
        } else {
          *reinterpret_cast<uint32_t*>(qd) = *reinterpret_cast<const uint32_t*>(qo);
          *reinterpret_cast<uint32_t*>(kd) = *reinterpret_cast<const uint32_t*>(ko);
        }
      }
      const float w = wts[tl];
      bf16* vd = static_cast<bf16*>(p.V) + row * P + lane * kC;
      bf16* wd = static_cast<bf16*>(p.Vw) + row * P + lane * kC;
      if constexpr (kC == 2) {
        *reinterpret_cast<__nv_bfloat162*>(vd) = __floats2bfloat162_rn(x[a][0], x[a][1]);
        *reinterpret_cast<__nv_bfloat162*>(wd) = __floats2bfloat162_rn(w * x[a][0], w * x[a][1]);
      } else {
        vd[0] = __float2bfloat16_rn(x[a][0]), wd[0] = __float2bfloat16_rn(w * x[a][0]);
      }
    }
  }
}

// The SISO build where every chunk is full (L a multiple of T, T of 16): batched_build_siso_kernel's loads,
// arithmetic and stores, with the addresses of the warp's rows stepped from pointers made once, no padding-row
// predicates, and the chunk scalars (w for w ⊙ v) from chunk_scalars_kernel, run before, instead of
// build_chunk_scalars' three barriers and serial scan. (ncu, 125M: half of the general kernel's 1,300 instructions per
// warp were 64-bit index and address arithmetic, and 21 % of its stall samples were warps waiting at those barriers.)
// kQOnly (p.build_q_only): q alone — k, v and the forward chain's states come from launch_kv_chain.
template <int N, int P, bool kX16, bool kQOnly>
__device__ __forceinline__ void build_siso_full_body(const BatchedParams& p) {
  constexpr int kE = N >= 64 ? N / 32 : 2, kLanes = N / kE, kC = P / 32, kRowsAhead = 2;
  using bf16 = __nv_bfloat16;
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int g = ix.h / (d.H / d.G), warp = threadIdx.x / 32, lane = threadIdx.x % 32, n0 = lane * kE;
  // (p.qk_rotated_only: only the lanes on the rotated half [0, N/2) form and store q and k, at row pitch N/2)
  const bool qk_lane = lane < kLanes && (!p.qk_rotated_only || n0 < N / 2);
  const int qk_pitch = p.qk_rotated_only ? N / 2 : N;
  float bq[kE], bk[kE];
#pragma unroll
  for (int e = 0; e < kE; ++e)
    bq[e] = qk_lane ? p.C_bias[int64_t(ix.h) * N + n0 + e] : 0.0f, bk[e] = qk_lane ? p.B_bias[int64_t(ix.h) * N + n0 + e] : 0.0f;
  const int64_t tok0 = int64_t(ix.b) * d.L + ix.c0 + warp, row0 = ix.chunk * p.rows + warp;
  const float* zc = p.zx + tok0 * d.din + d.off_C + int64_t(g) * N + n0;
  const int bc_off = d.off_B - d.off_C, z_step = kWarps * d.din;  // (32-bit steps: fewer live registers)
  int64_t ph = (ix.bh * d.L + ix.c0 + warp) * d.S + n0 / 2;       // (the row's angles: angle_at)
  const int ph_step = kWarps * d.S;
  const int64_t xcol = d.off_x + int64_t(ix.h) * P + lane * kC;
  const int64_t x_pitch = kX16 ? 2 * int64_t(d.d_inner) : d.din;
  const int x_step = kWarps * int(x_pitch);
  const bf16* x16 = kX16 ? reinterpret_cast<const bf16*>(p.zx16) + tok0 * x_pitch + xcol : nullptr;
  const float* x32 = kX16 ? nullptr : p.zx + tok0 * x_pitch + xcol;
  bf16* qd = static_cast<bf16*>(p.Q) + row0 * qk_pitch + n0;
  bf16* kd = static_cast<bf16*>(p.K) + row0 * qk_pitch + n0;
  bf16* vd = static_cast<bf16*>(p.V) + row0 * P + lane * kC;
  bf16* wd = static_cast<bf16*>(p.Vw) + row0 * P + lane * kC;
  bool rot[kE / 2];
#pragma unroll
  for (int m = 0; m < kE / 2; ++m) rot[m] = qk_lane && n0 / 2 + m < d.S;
  const int step_n = kWarps * qk_pitch;
  constexpr int kStepP = kWarps * P;
  const float* wp = p.wv + ix.chunk * p.T + warp;  // (chunk_scalars_kernel's w, by the build's rows)
  float c[kRowsAhead][kE], k[kRowsAhead][kE], cs[kRowsAhead][kE / 2][2], x[kRowsAhead][kC], w[kRowsAhead];
  // The next kRowsAhead rows' loads into c, k, cs, x; then the pointers step past them.
  const auto load = [&] {
#pragma unroll
    for (int a = 0; a < kRowsAhead; ++a) {
      const float* zca = zc + a * z_step;
      w[a] = wp[a * kWarps];
      if (qk_lane) {
        if constexpr (kE == 4) {
          const float4 cv = *reinterpret_cast<const float4*>(zca);
          c[a][0] = cv.x, c[a][1] = cv.y, c[a][2] = cv.z, c[a][3] = cv.w;
          if constexpr (!kQOnly) {
            const float4 kv = *reinterpret_cast<const float4*>(zca + bc_off);
            k[a][0] = kv.x, k[a][1] = kv.y, k[a][2] = kv.z, k[a][3] = kv.w;
          }
        } else {
          const float2 cv = *reinterpret_cast<const float2*>(zca);
          c[a][0] = cv.x, c[a][1] = cv.y;
          if constexpr (!kQOnly) {
            const float2 kv = *reinterpret_cast<const float2*>(zca + bc_off);
            k[a][0] = kv.x, k[a][1] = kv.y;
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) c[a][e] = k[a][e] = 0.0f;
      }
#pragma unroll
      for (int m = 0; m < kE / 2; ++m) {
        const float2 r =
            rot[m] ? rotary_cos_sin(angle_at(p.phi, p.phi_code, ph + a * ph_step + m)) : make_float2(1.0f, 0.0f);
        cs[a][m][0] = r.x, cs[a][m][1] = r.y;
      }
      if constexpr (kQOnly) {
      } else if constexpr (kX16) {
        const bf16* xr = x16 + a * x_step;
        if constexpr (kC == 2) {
          const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xr));
          x[a][0] = xv.x, x[a][1] = xv.y;
        } else {
          x[a][0] = __bfloat162float(xr[0]);
        }
      } else {
        const float* xr = x32 + a * x_step;
        if constexpr (kC == 2) {
          const float2 xv = *reinterpret_cast<const float2*>(xr);
          x[a][0] = xv.x, x[a][1] = xv.y;
        } else {
          x[a][0] = xr[0];
        }
      }
    }
    zc += kRowsAhead * z_step, ph += kRowsAhead * ph_step, wp += kRowsAhead * kWarps;
    if constexpr (kX16) x16 += kRowsAhead * x_step;
    else x32 += kRowsAhead * x_step;
  };
  load();
  for (int j0 = warp; j0 < p.T; j0 += kRowsAhead * kWarps) {
#pragma unroll
    for (int a = 0; a < kRowsAhead; ++a) {
      if (qk_lane) {
        __nv_bfloat162 qo[kE / 2], ko[kE / 2];
#pragma unroll
        for (int m = 0; m < kE / 2; ++m) {
          const float cv = cs[a][m][0], sv = cs[a][m][1];
          qo[m] = rotated_pair(c[a][2 * m], c[a][2 * m + 1], bq[2 * m], bq[2 * m + 1], cv, sv, rot[m]);
          if constexpr (!kQOnly)
            ko[m] = rotated_pair(k[a][2 * m], k[a][2 * m + 1], bk[2 * m], bk[2 * m + 1], cv, sv, rot[m]);
        }
        if constexpr (kE == 4) {
          *reinterpret_cast<uint2*>(qd + a * step_n) = *reinterpret_cast<const uint2*>(qo);
          if constexpr (!kQOnly) *reinterpret_cast<uint2*>(kd + a * step_n) = *reinterpret_cast<const uint2*>(ko);
        } else {
          *reinterpret_cast<uint32_t*>(qd + a * step_n) = *reinterpret_cast<const uint32_t*>(qo);
          if constexpr (!kQOnly) *reinterpret_cast<uint32_t*>(kd + a * step_n) = *reinterpret_cast<const uint32_t*>(ko);
        }
      }
      if constexpr (kQOnly) continue;
      // (p.vw_formed: the chain and the fused core form w ⊙ v from v themselves, scale_pair's bits)
      if constexpr (kC == 2) {
        *reinterpret_cast<__nv_bfloat162*>(vd + a * kStepP) = __floats2bfloat162_rn(x[a][0], x[a][1]);
        if (!p.vw_formed)
          *reinterpret_cast<__nv_bfloat162*>(wd + a * kStepP) =
              __floats2bfloat162_rn(__fmul_rn(w[a], x[a][0]), __fmul_rn(w[a], x[a][1]));
      } else {
        vd[a * kStepP] = __float2bfloat16_rn(x[a][0]);
        if (!p.vw_formed) wd[a * kStepP] = __float2bfloat16_rn(__fmul_rn(w[a], x[a][0]));
      }
    }
    qd += kRowsAhead * step_n, kd += kRowsAhead * step_n, vd += kRowsAhead * kStepP, wd += kRowsAhead * kStepP;
    if (j0 + kRowsAhead * kWarps < p.T) load();
  }
}

template <int N, int P, bool kX16, bool kQOnly = false>
__global__ void __launch_bounds__(kThreads, 4) batched_build_siso_full_kernel(const BatchedParams p) {
  pdl_wait();
  build_siso_full_body<N, P, kX16, kQOnly>(p);
}

// q alone beside the kv chain (p.q_beside): the kv chain triggers right after its own wait, so this runs while it does.
// It reads zx's C rows, the angle codes and the biases, all complete before the chunk scalars that the kv chain waited
// for, and writes Q, which nothing before it reads any more; it waits for the kv chain before it exits, so the forward
// core, waiting for it, also waits for the kv chain's k, v and states.
template <int N, int P>
__global__ void __launch_bounds__(kThreads, 4) build_q_beside_kernel(const BatchedParams p) {
  pdl_beside();
  build_siso_full_body<N, P, true, true>(p);
  pdl_wait();
}

// The output-stage backward's D and norm-weight partials at the block's end (both SISO kernels): each warp's sums
// (its tokens in order), then the warps' in order, through shared memory ((kWarps, P) norm-weight partials, then
// (kWarps) D partials).
template <int P>
__device__ __forceinline__ void output_backward_partials(const BatchedParams& p, const ChunkIndex& ix,
                                                         const float (&gn)[P / 32], float gD, bool norm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  gD = warp_sum(gD);
  extern __shared__ float sm[];
  float* wD = sm + kWarps * P;
#pragma unroll
  for (int k = 0; k < P / 32; ++k) sm[warp * P + lane + 32 * k] = gn[k];
  if (lane == 0) wD[warp] = gD;
  __syncthreads();
  const int64_t prow = ix.prow(p);
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += wD[w];
    p.part_D[prow] = s;
  }
  if (norm)
    for (int q = threadIdx.x; q < P; q += kThreads) {
      float s = 0.0f;
      for (int w = 0; w < kWarps; ++w) s += sm[w * P + q];
      p.part_norm[prow * P + q] = s;
    }
}

// The output stage's backward, SISO instance (bf16 operands, P 32 or 64): batched_output_kernel<true>'s arithmetic,
// channel mapping (q = lane + 32k) and summation orders, with a token's y, dy, Z and v and the per-channel norm-weight
// and D partials in registers instead of per-warp shared rows, and every load of a token before its stores.
// (ncu: the generic kernel ran at 54 % SM and 33 % DRAM, 80 registers, 37.5 % occupancy.)
// kTokens (1 or 2) of a warp's tokens at a time: all their loads before the first one's arithmetic.
template <int P, int kTokens>
__global__ void __launch_bounds__(kThreads, 4) batched_output_backward_siso_kernel(const BatchedParams p) {
  pdl_wait();
  constexpr int kQ = P / 32;
  using bf16 = __nv_bfloat16;
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool norm = d.outnorm;
  const float Dh = p.D[ix.h];
  const bf16* V = static_cast<const bf16*>(p.V);
  bf16 *dY = static_cast<bf16*>(p.dY), *dYe = static_cast<bf16*>(p.dYe);
  float nw[kQ], gn[kQ], gD = 0.0f;
#pragma unroll
  for (int k = 0; k < kQ; ++k) nw[k] = norm ? p.norm[int64_t(ix.h) * P + lane + 32 * k] : 1.0f, gn[k] = 0.0f;
  // A token's loads (nothing for the chunk's padding rows past Tc).
  struct Token {
    float zv[kQ], vv[kQ], y[kQ], z[kQ], dO[kQ], e;
  };
  auto load = [&](int tl, Token& t) {
    if (tl >= ix.Tc) return;
    const int64_t row0 = (ix.chunk * p.rows + tl) * P, tok = int64_t(ix.b) * d.L + ix.c0 + tl;
    t.e = p.eL[ix.chunk * p.T + tl];
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      const int q = lane + 32 * k;
      const int64_t i = row0 + q;
      if (p.zy16) {  // (Z and y in bf16: y as the forward core formed it)
        t.zv[k] = __bfloat162float(reinterpret_cast<const bf16*>(p.Z)[i]);
        t.y[k] = __bfloat162float(reinterpret_cast<const bf16*>(p.WV)[i]);
      } else {
        t.zv[k] = p.Z[i], t.y[k] = p.WV[i];
      }
      t.vv[k] = __bfloat162float(V[i]);
      t.z[k] = zx_col(p, tok, int64_t(ix.h) * P + q);
      t.dO[k] = dO_at(p, tok * d.d_inner + int64_t(ix.h) * P + q);
    }
  };
  // Its arithmetic and stores; the norm-weight and D partials gathered in the warp's token order.
  auto finish = [&](int tl, Token& t) {
    const int64_t row0 = (ix.chunk * p.rows + tl) * P;
    if (tl >= ix.Tc) {
#pragma unroll
      for (int k = 0; k < kQ; ++k) dY[row0 + lane + 32 * k] = dYe[row0 + lane + 32 * k] = __float2bfloat16_rn(0.0f);
      if (lane == 0) p.dLam[ix.chunk * p.T + tl] = 0.0f;
      return;
    }
    const float e = t.e;
    const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + tl;
    float* y = t.y;
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      if (!p.zy16) y[k] = (e * t.zv[k] + Dh * t.vv[k]) + y[k];
      ss += y[k] * y[k];
    }
    const float rstd = norm ? 1.0f / sqrtf(warp_sum(ss) / float(P) + kEps) : 1.0f;
    float dyn[kQ], mean = 0.0f;
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      const int q = lane + 32 * k;
      const float yn = norm ? y[k] * rstd * nw[k] : y[k];
      const float sg = gate_sigmoid_f(t.z[k], true), si = t.z[k] * sg;  // (bf16 mode only)
      const float o = yn * si, dz = t.dO[k] * yn * sg * (1.0f + t.z[k] * (1.0f - sg));
      dyn[k] = t.dO[k] * si;
      const int64_t oi = tok * d.d_inner + int64_t(ix.h) * P + q;
      if (p.o) p.o[oi] = o;
      if (p.o16) static_cast<bf16*>(p.o16)[oi] = __float2bfloat16_rn(o);
      const int64_t zi = tok * d.din + int64_t(ix.h) * P + q;  // dzx's z column
      if (p.dzx16) reinterpret_cast<bf16*>(p.dzx16)[zi] = __float2bfloat16_rn(dz);
      else p.dzx[zi] = dz;
      if (norm) mean += dyn[k] * nw[k] * (y[k] * rstd);
    }
    if (norm) mean = warp_sum(mean) / float(P);
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      const int q = lane + 32 * k;
      float v = dyn[k];
      if (norm) {
        const float xh = y[k] * rstd;
        gn[k] += dyn[k] * xh;
        v = rstd * (dyn[k] * nw[k] - xh * mean);
      }
      dY[row0 + q] = __float2bfloat16_rn(v), dYe[row0 + q] = __float2bfloat16_rn(e * v);
      dot += v * t.zv[k];
      gD += v * t.vv[k];
    }
    dot = warp_sum(dot);
    if (lane == 0) p.dLam[ix.chunk * p.T + tl] = 0.0f + e * dot;
  };
  // kTokens of the warp's tokens loaded before any is finished (one at a time leaves every token's load latency
  // exposed); finished in the warp's token order, so the partials' sums are the same either way.
  for (int tl = warp; tl < p.T; tl += kTokens * kWarps) {
    Token t[kTokens];
#pragma unroll
    for (int j = 0; j < kTokens; ++j)
      if (tl + j * kWarps < p.T) load(tl + j * kWarps, t[j]);
#pragma unroll
    for (int j = 0; j < kTokens; ++j)
      if (tl + j * kWarps < p.T) finish(tl + j * kWarps, t[j]);
  }
  output_backward_partials<P>(p, ix, gn, gD, norm);
}

// batched_output_backward_siso_kernel for sequences of whole chunks in the training step's configuration (z, dO and
// dzx in bf16, o not written: the forward kept it), with compile-time flags for those and the output norm, and the
// addresses of the warp's tokens stepped from pointers made once. The same expressions and sums in the same orders.
// (ncu, 125M: the general instance issued 2,000 instructions per warp, ~half of them index arithmetic and per-element
// branches on the runtime flags, at 0.7 IPC per scheduler: issue-bound.)
template <int P, int kTokens, bool kNorm, bool kZy16>
__global__ void __launch_bounds__(kThreads, 4) batched_output_backward_siso_full_kernel(const BatchedParams p) {
  pdl_wait();
  constexpr int kQ = P / 32;
  using bf16 = __nv_bfloat16;
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  [[maybe_unused]] const float Dh = p.D[ix.h];  // (kZy16: y comes formed)
  float nw[kQ], gn[kQ], gD = 0.0f;
#pragma unroll
  for (int k = 0; k < kQ; ++k) nw[k] = kNorm ? p.norm[int64_t(ix.h) * P + lane + 32 * k] : 1.0f, gn[k] = 0.0f;
  // The warp's first token's elements (lane, lane + 32): chunk rows, chunk scalars and token rows; each step is
  // kWarps tokens.
  const int64_t row = (ix.chunk * p.rows + warp) * P + lane, cs = ix.chunk * p.T + warp;
  const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + warp, col = int64_t(ix.h) * P + lane;
  const float *Z = p.Z + row, *WV = p.WV + row, *eL = p.eL + cs;
  const bf16 *Z16 = reinterpret_cast<const bf16*>(p.Z) + row, *Y16 = reinterpret_cast<const bf16*>(p.WV) + row;
  const bf16* V = static_cast<const bf16*>(p.V) + row;
  bf16 *dY = static_cast<bf16*>(p.dY) + row, *dYe = static_cast<bf16*>(p.dYe) + row;
  float* dLam = p.dLam + cs;
  const bf16* z16 = reinterpret_cast<const bf16*>(p.zx16) + tok * 2 * d.d_inner + col;
  const bf16* dO16 = reinterpret_cast<const bf16*>(p.dO16) + tok * d.d_inner + col;
  bf16* dz16 = reinterpret_cast<bf16*>(p.dzx16) + tok * d.din + col;
  const int row_step = kWarps * P, z_step = kWarps * 2 * d.d_inner, o_step = kWarps * d.d_inner,
            dz_step = kWarps * d.din;
  struct Token {
    float zv[kQ], vv[kQ], y[kQ], z[kQ], dO[kQ], e;
  };
  // Token j of the warp's current kTokens (pointers at the first).
  auto load = [&](int j, Token& t) {
    t.e = eL[j * kWarps];
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      const int i = j * row_step + 32 * k;
      if constexpr (kZy16) t.zv[k] = __bfloat162float(Z16[i]), t.y[k] = __bfloat162float(Y16[i]);
      else t.zv[k] = Z[i], t.y[k] = WV[i];
      t.vv[k] = __bfloat162float(V[i]);
      t.z[k] = __bfloat162float(z16[j * z_step + 32 * k]);
      t.dO[k] = __bfloat162float(dO16[j * o_step + 32 * k]);
    }
  };
  auto finish = [&](int j, Token& t) {
    const float e = t.e;
    float* y = t.y;
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      if constexpr (!kZy16) y[k] = (e * t.zv[k] + Dh * t.vv[k]) + y[k];
      ss += y[k] * y[k];
    }
    const float rstd = kNorm ? 1.0f / sqrtf(warp_sum(ss) / float(P) + kEps) : 1.0f;
    float dyn[kQ], mean = 0.0f;
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      const float yn = kNorm ? y[k] * rstd * nw[k] : y[k];
      const SisoGateGrad gg = siso_gate_backward(t.dO[k], t.z[k], yn);  // (bf16 mode only)
      dyn[k] = gg.dyn;
      dz16[j * dz_step + 32 * k] = __float2bfloat16_rn(gg.dz);
      if (kNorm) mean += dyn[k] * nw[k] * (y[k] * rstd);
    }
    if (kNorm) mean = warp_sum(mean) / float(P);
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      float v = dyn[k];
      if (kNorm) {
        const float xh = y[k] * rstd;
        gn[k] += dyn[k] * xh;
        v = rstd * (dyn[k] * nw[k] - xh * mean);
      }
      const int i = j * row_step + 32 * k;
      dY[i] = __float2bfloat16_rn(v), dYe[i] = __float2bfloat16_rn(__fmul_rn(e, v));
      dot = __fmaf_rn(v, t.zv[k], dot);  // (the roundings as the fused core's output part has them)
      gD = __fmaf_rn(v, t.vv[k], gD);
    }
    dot = warp_sum(dot);
    if (lane == 0) dLam[j * kWarps] = __fmul_rn(e, dot);
  };
  for (int tl = warp; tl < p.T; tl += kTokens * kWarps) {  // (p.T a multiple of kTokens · kWarps)
    Token t[kTokens];
#pragma unroll
    for (int j = 0; j < kTokens; ++j) load(j, t[j]);
#pragma unroll
    for (int j = 0; j < kTokens; ++j) finish(j, t[j]);
    Z += kTokens * row_step, WV += kTokens * row_step, V += kTokens * row_step;
    Z16 += kTokens * row_step, Y16 += kTokens * row_step;
    dY += kTokens * row_step, dYe += kTokens * row_step;
    eL += kTokens * kWarps, dLam += kTokens * kWarps;
    z16 += kTokens * z_step, dO16 += kTokens * o_step, dz16 += kTokens * dz_step;
  }
  output_backward_partials<P>(p, ix, gn, gD, kNorm);
}

// Vw = bf16(w ⊙ v) per chunk row (16-byte pieces), for a backward path that reads it where the forward left it to its
// readers (p.vw_formed): the build's expression on v's bits.
__global__ void __launch_bounds__(kThreads) form_vw_kernel(const BatchedParams p) {
  pdl_wait();
  using bf16 = __nv_bfloat16;
  const int64_t chunk = blockIdx.x, n = int64_t(p.rows) * p.d.P / 8;
  const uint4* v4 = reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.V) + chunk * p.rows * p.d.P);
  uint4* w4 = reinterpret_cast<uint4*>(static_cast<bf16*>(p.Vw) + chunk * p.rows * p.d.P);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const float w = p.wv[chunk * p.T + k * 8 / p.d.P];
    uint4 v = v4[k];
    uint32_t* u = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) u[i] = mma_bf16::scale_pair(u[i], w, w);
    w4[k] = v;
  }
}

// e^Λ ⊙ dy for the reverse chain when the fused core forms the rest of the output stage's backward (p.core_output;
// whole chunks, no output norm, z and dO in bf16): the output-stage backward's e^Λ ⊙ dy bits, from dO, z and e^Λ
// only. A thread takes 16 consecutive channels of a token (16-byte loads and stores).
template <int P>
__global__ void __launch_bounds__(kThreads) output_dye_siso_kernel(const BatchedParams p) {
  pdl_wait();
  using bf16 = __nv_bfloat16;
  constexpr int kPer = 16, kSlots = P / kPer, kRowsPerPass = kThreads / kSlots;
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int c = int(threadIdx.x) % kSlots * kPer;
  for (int tl = int(threadIdx.x) / kSlots; tl < p.T; tl += kRowsPerPass) {
    const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + tl, col = int64_t(ix.h) * P + c;
    const float e = p.eL[ix.chunk * p.T + tl];
    const uint4* o4 = reinterpret_cast<const uint4*>(reinterpret_cast<const bf16*>(p.dO16) + tok * d.d_inner + col);
    const uint4* z4 = reinterpret_cast<const uint4*>(reinterpret_cast<const bf16*>(p.zx16) + tok * 2 * d.d_inner + col);
    uint4 ov[2] = {o4[0], o4[1]}, zv[2] = {z4[0], z4[1]}, out[2];
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const bf16* ob = reinterpret_cast<const bf16*>(&ov[v]);
      const bf16* zb = reinterpret_cast<const bf16*>(&zv[v]);
      bf16* wb = reinterpret_cast<bf16*>(&out[v]);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float z = __bfloat162float(zb[i]);
        const float dy = siso_gate_dy(__bfloat162float(ob[i]), z, gate_sigmoid_f(z, true));
        wb[i] = __float2bfloat16_rn(__fmul_rn(e, dy));
      }
    }
    uint4* w4 = reinterpret_cast<uint4*>(static_cast<bf16*>(p.dYe) + (ix.chunk * p.rows + tl) * P + c);
    w4[0] = out[0], w4[1] = out[1];
  }
}

// The rotation backward's SISO instance (bf16 operands, N 32/64/128): the generic kernel's arithmetic and order, but a
// lane takes kE = max(N/32, 2) consecutive elements of a row (kE/2 rotary pairs) with vector loads and stores, and
// its bias partials in shared memory as float4/float2 (one access per head and token where the generic kernel made
// one per element). The same sums: per warp its tokens in order, then the warps in order.
// kFormQK: q and k formed again from zx's normalised B/C rows, the biases and φ exactly as the SISO build formed them
// (rotated_pair: the same bits) instead of read back — a token's B/C rows are read once for the block's heads (q and
// k are H× the group's B/C; 125M: 201 MB fewer per layer). kHb = hb heads at a time have every load issued before
// their arithmetic: one head at a time left the kernel latency-bound (ncu, 125M: 194 µs per layer at 64 % of DRAM
// bandwidth reading q and k, 197 µs at 44 % forming them).
// kFuseNorm: one block per (sequence, group, chunk) walks all the group's slots of hb heads, keeping each token's
// slot sums of the B/C gradients in shared memory (in slot order: the sums the separate kernel forms from dBn/dCn),
// then runs the B/C RMSNorm backward of bc_norm_backward_kernel for its tokens — no dBn/dCn round trip through
// global memory (125M: 100 MB written and read per layer) and no separate launch. Otherwise a block per (sequence,
// slot, chunk) writes its slot's sums to dBn/dCn.
// kUnrotated (p.dqk_unrotated, with kFuseNorm and without kFormQK): the fused core un-rotated dQ16/dK16 and wrote dφ
// itself; the kernel sums them over the heads as they are (no angles, no q or k).
// p.angle_seg (rotation_backward_writes_angle_totals: the chunk is an angle segment, S 16 or 32): each warp also sums
// its tokens' dφ per head and angle in token order, and the warps' sums are added as the angle totals kernel adds its
// eight phases (its bits), so that the angle backward needs no totals kernel (a read of dφ: 17–22 µs per 125M layer).
// kSplit (N 128 only): lane l takes the rotary pairs l and l + 32 — elements 2l, 2l + 1, 64 + 2l, 64 + 2l + 1 —
// instead of the four consecutive elements 4l … 4l + 3. The rotating pairs are the first S (S ≤ 32 in the presets),
// so with consecutive elements only lanes 0 … S/2 − 1 rotated, two pairs each, while the warp's other lanes waited:
// split, every lane rotates at most one pair and the warp issues the rotation's instructions once instead of twice.
// Every element's expressions and every sum's order are the same (all sums are per element or per pair): the bits.
// kPipe (with kSplit, q and k formed, bf16 dQ/dK, S ≤ 32): a warp's next token's loads go to registers before it works
// on the current one (and the token after into L2), so that the loads wait behind a token's arithmetic instead of in
// front of it (ncu, 125M: 38 % of the cycles between a warp's instructions were waits on its loads). The same
// arithmetic in the same order: the bits.
template <int N, bool kFormQK, int kHb, bool kFuseNorm, bool kPrefetch, bool kUnrotated = false, bool kSplit = false,
          bool kPipe = false>
__global__ void __launch_bounds__(kThreads, 2) batched_rotation_backward_siso_kernel(const BatchedParams p) {
  pdl_wait();
  static_assert(!kUnrotated || (kFuseNorm && !kFormQK), "the un-rotated instance: the norm inside, q and k unused");
  static_assert(!kSplit || N == 128, "the split lane map: two pairs per lane, 32 lanes apart");
  static_assert(!kPipe || (kSplit && kFormQK && kPrefetch && !kUnrotated), "the pipelined instance");
  constexpr int kE = N >= 64 ? N / 32 : 2, kLanes = N / kE, kPairs = kE / 2;
  using V = std::conditional_t<kE == 4, float4, float2>;
  const MixerDims& d = p.d;
  const int slots = d.H / kHb, spg = slots / d.G, S = d.S;  // (kHb = p.heads_per_block)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n0 = lane * kE;
  // The lane's pair m (its elements 2·pair(m) and 2·pair(m) + 1).
  const auto pair = [&](int m) { return kSplit ? lane + 32 * m : n0 / 2 + m; };
  const int c = int(blockIdx.x % p.nc), unit = int(blockIdx.x / p.nc % (kFuseNorm ? d.G : slots));
  const int b = int(blockIdx.x / p.nc / (kFuseNorm ? d.G : slots));
  const int c0 = c * p.T, Tc = min(p.T, d.L - c0);
  const int slot_begin = kFuseNorm ? unit * spg : unit, slot_end = kFuseNorm ? slot_begin + spg : unit + 1;
  const int g = slot_begin / spg;  // the block's heads share one B/C group
  const __nv_bfloat16 *__restrict__ Q = static_cast<const __nv_bfloat16*>(p.Q),
                      *__restrict__ K = static_cast<const __nv_bfloat16*>(p.K);
  const float *__restrict__ dQ = p.dQ, *__restrict__ dK = p.dK, *__restrict__ phiv = p.phi;
  const uint16_t* __restrict__ codes = p.phi_code;  // (the angles as codes, where given: phiv is then null)
  // The L2 prefetch of angle i's line, whichever form holds it.
  const auto prefetch_angle = [&](int64_t i) {
    if (codes)
      prefetch_l2(codes + i);
    else
      prefetch_l2(phiv + i);
  };
  float *__restrict__ dphi_out = p.dphi, *__restrict__ dCn = p.dCn, *__restrict__ dBn = p.dBn;
  // (kWarps, kHb, 2, N): gC then gB per warp and head (the bias partials); kFuseNorm: then (T, 2, N), each token's
  // C and B gradients summed over the slots walked so far.
  extern __shared__ float sm[];
  float* sumCB = sm + kWarps * kHb * 2 * N;
  // (p.angle_seg: the warps' sums of dφ, (kWarps, kHb, S), after the partials and the token sums)
  float* seg_sm = sumCB + (kFuseNorm ? p.T * 2 * N : 0);
  const bool totals = !kUnrotated && p.angle_seg != nullptr;
  for (int e = threadIdx.x; e < kWarps * kHb * 2 * N + (kFuseNorm ? p.T * 2 * N : 0); e += kThreads) sm[e] = 0.0f;
  __syncthreads();
  float* mine = sm + warp * kHb * 2 * N;
  const auto load_v = [](const float* src, float* out) {
    const V v = *reinterpret_cast<const V*>(src);
    if constexpr (kE == 4) out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    else out[0] = v.x, out[1] = v.y;
  };
  const auto load_h = [](const uint16_t* src, float* out) {  // kE bf16 (the cores' dQ16 and dK16, or q and k), one load
    using H = std::conditional_t<kE == 4, uint2, uint32_t>;
    const H v = *reinterpret_cast<const H*>(src);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
    for (int e = 0; e < kE; e += 2) {
      const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[e / 2]));
      out[e] = f.x, out[e + 1] = f.y;
    }
  };
  const auto add_v = [](float* dst, const float* in) {
    V v = *reinterpret_cast<V*>(dst);
    if constexpr (kE == 4) v.x += in[0], v.y += in[1], v.z += in[2], v.w += in[3];
    else v.x += in[0], v.y += in[1];
    *reinterpret_cast<V*>(dst) = v;
  };
  const auto store_v = [](float* dst, const float* in) {
    V v;
    if constexpr (kE == 4) v = make_float4(in[0], in[1], in[2], in[3]);
    else v = make_float2(in[0], in[1]);
    *reinterpret_cast<V*>(dst) = v;
  };
  // The lane's elements of a row (row: its element 0), in the lane map: kE consecutive elements from n0, or (kSplit)
  // the two elements of each of its pairs.
  const auto load_row = [&](const float* row, float* out) {
    if constexpr (kSplit) {
#pragma unroll
      for (int m = 0; m < kPairs; ++m) {
        const float2 v = *reinterpret_cast<const float2*>(row + 2 * pair(m));
        out[2 * m] = v.x, out[2 * m + 1] = v.y;
      }
    } else {
      load_v(row + n0, out);
    }
  };
  const auto load_row_h = [&](const uint16_t* row, float* out) {
    if constexpr (kSplit) {
#pragma unroll
      for (int m = 0; m < kPairs; ++m) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(row + 2 * pair(m));
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
        out[2 * m] = f.x, out[2 * m + 1] = f.y;
      }
    } else {
      load_h(row + n0, out);
    }
  };
  const auto add_row = [&](float* row, const float* in) {
    if constexpr (kSplit) {
#pragma unroll
      for (int m = 0; m < kPairs; ++m) {
        float2* at = reinterpret_cast<float2*>(row + 2 * pair(m));
        float2 v = *at;
        v.x += in[2 * m], v.y += in[2 * m + 1];
        *at = v;
      }
    } else {
      add_v(row + n0, in);
    }
  };
  const auto store_row = [&](float* row, const float* in) {
    if constexpr (kSplit) {
#pragma unroll
      for (int m = 0; m < kPairs; ++m)
        *reinterpret_cast<float2*>(row + 2 * pair(m)) = make_float2(in[2 * m], in[2 * m + 1]);
    } else {
      store_v(row + n0, in);
    }
  };
  // A head's un-rotated C and B gradients at a token: into the warp's bias partials and the sums over the slot's heads.
  const auto head_sums = [&](int i, const float* gc, const float* gb, float* sC, float* sB) {
    float* gC = mine + (i * 2) * N;
    add_row(gC, gc), add_row(gC + N, gb);
#pragma unroll
    for (int e = 0; e < kE; ++e) sC[e] += gc[e], sB[e] += gb[e];
  };
  // A token's sums over the slot's heads: into its slot sums in shared memory (the norm inside), else to dCn/dBn.
  const auto token_sums = [&](int tl, int64_t tok, int slot, const float* sC, const float* sB) {
    if constexpr (kFuseNorm) {  // (only this warp touches token tl's sums)
      add_row(sumCB + (tl * 2) * N, sC), add_row(sumCB + (tl * 2 + 1) * N, sB);
    } else {
      const int64_t out = (tok * slots + slot) * N;
      store_row(dCn + out, sC), store_row(dBn + out, sB);
    }
  };
  for (int slot = slot_begin; slot < slot_end; ++slot) {
    const int h0 = slot * kHb;
    float dphi_sum[kHb][kPairs] = {};  // (totals) this warp's tokens' dφ, in token order
    if constexpr (kPipe) {
      // A token's loads as they arrive: zx's normalised C and B pairs, the heads' dQ and dK pairs (bf16), the angles
      // of the lane's first pair (S ≤ 32 here: its second pair, 32 + lane, does not rotate).
      struct Raw {
        float2 zc[kPairs], zb[kPairs];
        uint32_t q[kHb][kPairs], k[kHb][kPairs];
        uint32_t ph[kHb];  // (the angle's code, or its f32 bits: decoded where used)
      };
      // Addresses as the slot's base pointers (formed once per slot) and 32-bit offsets from them: with 64-bit
      // indices per token and head (the chunk row, the angle row, the biases' rows) a third of the kernel's
      // instructions were address arithmetic (ncu, 125M, fifty-ninth session). The launcher takes this instance only
      // where a slot's offsets fit 32 bits.
      const int64_t bh0 = int64_t(b) * d.H + h0;
      const uint16_t *q_blk = p.dQ16 + (bh0 * p.nc + c) * p.rows * N, *k_blk = p.dK16 + (bh0 * p.nc + c) * p.rows * N;
      const int head_qk = p.nc * p.rows * N, head_s = d.L * S;  // a head's step in dQ16/dK16, in the angle rows
      const int64_t s_blk = (bh0 * d.L + c0) * S;               // the slot's first angle row (token c0 of head h0)
      const uint16_t* codes_blk = codes ? codes + s_blk : nullptr;
      const float* phi_blk = codes ? nullptr : phiv + s_blk;
      float* dphi_blk = dphi_out + s_blk;
      const float* zC_blk = p.zx + (int64_t(b) * d.L + c0) * d.din + d.off_C + int64_t(g) * N;
      const int zB_off = d.off_B - d.off_C;
      const float *cbias = p.C_bias + int64_t(h0) * N + 2 * lane, *bbias = p.B_bias + int64_t(h0) * N + 2 * lane;
      const auto load_token = [&](int tl, Raw& r) {
        const float *zC = zC_blk + tl * d.din, *zB = zC + zB_off;
#pragma unroll
        for (int m = 0; m < kPairs; ++m) {
          r.zc[m] = *reinterpret_cast<const float2*>(zC + 2 * pair(m));
          r.zb[m] = *reinterpret_cast<const float2*>(zB + 2 * pair(m));
        }
        const bool next = tl + kWarps < Tc;  // (the token after this one, into L2)
        if (next) prefetch_l2(zC + n0 + kWarps * d.din), prefetch_l2(zB + n0 + kWarps * d.din);
#pragma unroll
        for (int i = 0; i < kHb; ++i) {
          const int jr = i * head_qk + tl * N, sr = i * head_s + tl * S;
#pragma unroll
          for (int m = 0; m < kPairs; ++m) {
            r.q[i][m] = *reinterpret_cast<const uint32_t*>(q_blk + jr + 2 * pair(m));
            r.k[i][m] = *reinterpret_cast<const uint32_t*>(k_blk + jr + 2 * pair(m));
          }
          r.ph[i] = lane >= S ? 0u : codes ? uint32_t(codes_blk[sr + lane]) : __float_as_uint(phi_blk[sr + lane]);
          if (next) {
            prefetch_l2(q_blk + jr + n0 + kWarps * N), prefetch_l2(k_blk + jr + n0 + kWarps * N);
            if (n0 / 2 < S) {
              if (codes)
                prefetch_l2(codes_blk + sr + kWarps * S + n0 / 2);
              else
                prefetch_l2(phi_blk + sr + kWarps * S + n0 / 2);
            }
          }
        }
      };
      const auto unpack = [](uint32_t w, float* out) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
        out[0] = f.x, out[1] = f.y;
      };
      Raw cur;
      if (warp < Tc) load_token(warp, cur);
      for (int tl = warp; tl < Tc; tl += kWarps) {
        const bool more = tl + kWarps < Tc;
        Raw nxt;
        if (more) load_token(tl + kWarps, nxt);
        const int64_t tok = int64_t(b) * d.L + c0 + tl;
        float zc[kE], zb[kE];
#pragma unroll
        for (int m = 0; m < kPairs; ++m) {
          zc[2 * m] = cur.zc[m].x, zc[2 * m + 1] = cur.zc[m].y;
          zb[2 * m] = cur.zb[m].x, zb[2 * m + 1] = cur.zb[m].y;
        }
        float sC[kE] = {}, sB[kE] = {};  // summed over the slot's heads
#pragma unroll
        for (int i = 0; i < kHb; ++i) {
          float gq[kE], gk[kE], gc[kE], gb[kE], dp[kPairs], bqv[kE], bkv[kE];
#pragma unroll
          for (int m = 0; m < kPairs; ++m) unpack(cur.q[i][m], gq + 2 * m), unpack(cur.k[i][m], gk + 2 * m);
          if (lane < S) {
            const float2 vc = *reinterpret_cast<const float2*>(cbias + i * N);
            const float2 vb = *reinterpret_cast<const float2*>(bbias + i * N);
            bqv[0] = vc.x, bqv[1] = vc.y, bkv[0] = vb.x, bkv[1] = vb.y;
          }
#pragma unroll
          for (int m = 0; m < kPairs; ++m) {
            const int a = 2 * m;
            float ca = gq[a], cb = gq[a + 1], ba = gk[a], bb = gk[a + 1];
            dp[m] = 0.0f;
            if (m == 0 && lane < S) {
              const float2 rot = rotary_cos_sin(codes ? angle_from_code(cur.ph[i]) : __uint_as_float(cur.ph[i]));
              const float cs = rot.x, sn = rot.y;
              const float2 q2 = __bfloat1622float2(rotated_pair(zc[a], zc[a + 1], bqv[a], bqv[a + 1], cs, sn, true));
              const float2 k2 = __bfloat1622float2(rotated_pair(zb[a], zb[a + 1], bkv[a], bkv[a + 1], cs, sn, true));
              const float qa = q2.x, qb = q2.y, ka = k2.x, kb = k2.y;
              float acc = 0.0f;
              acc += gq[a + 1] * qa - gq[a] * qb;
              acc += gk[a + 1] * ka - gk[a] * kb;
              dp[m] = acc;
              ca = gq[a] * cs + gq[a + 1] * sn, cb = gq[a + 1] * cs - gq[a] * sn;
              ba = gk[a] * cs + gk[a + 1] * sn, bb = gk[a + 1] * cs - gk[a] * sn;
            }
            gc[a] = ca, gc[a + 1] = cb, gb[a] = ba, gb[a + 1] = bb;
          }
          if (totals)
#pragma unroll
            for (int m = 0; m < kPairs; ++m) dphi_sum[i][m] += dp[m];
          if (lane < S) dphi_blk[i * head_s + tl * S + lane] = dp[0];
          head_sums(i, gc, gb, sC, sB);
        }
        token_sums(tl, tok, slot, sC, sB);
        if (more) cur = nxt;
      }
    } else if (lane < kLanes)
      for (int tl = warp; tl < Tc; tl += kWarps) {
        const int64_t t = c0 + tl, tok = int64_t(b) * d.L + t;
        float zc[kE], zb[kE];  // kFormQK: the token's normalised C and B (the group's), for every head of the slot
        // The warp's next token (tl + kWarps) into L2 while this one is loaded and worked on: the loop is a chain of
        // dependent load round trips, most of them to DRAM (ncu: 57 % of the samples at its first loads).
        const bool next = kPrefetch && tl + kWarps < Tc;
        if constexpr (kFormQK) {
          const float *zC = p.zx + tok * d.din + d.off_C + int64_t(g) * N, *zB = zC + (d.off_B - d.off_C);
          load_row(zC, zc), load_row(zB, zb);
          // (a prefetch per lane at its n0: the rows' lines whatever the lane map)
          if (next) prefetch_l2(zC + n0 + kWarps * d.din), prefetch_l2(zB + n0 + kWarps * d.din);
        }
        // The slot's loads: the gradients, q and k (unless formed) and the angles.
        float gq[kHb][kE], gk[kHb][kE], vq[kHb][kE], vk[kHb][kE], ph[kHb][kPairs];
#pragma unroll
        for (int i = 0; i < kHb; ++i) {
          const int64_t bh = int64_t(b) * d.H + h0 + i, chunk = bh * p.nc + c, st = bh * d.L + t;
          const int64_t jr = (chunk * p.rows + tl) * N, j = jr + n0;
          if (p.dQ16)
            load_row_h(p.dQ16 + jr, gq[i]), load_row_h(p.dK16 + jr, gk[i]);
          else
            load_row(dQ + jr, gq[i]), load_row(dK + jr, gk[i]);
          if (next) {
            if (p.dQ16) prefetch_l2(p.dQ16 + j + kWarps * N), prefetch_l2(p.dK16 + j + kWarps * N);
            else prefetch_l2(dQ + j + kWarps * N), prefetch_l2(dK + j + kWarps * N);
            if (!kUnrotated && n0 / 2 < S) prefetch_angle((st + kWarps) * S + n0 / 2);
          }
          if constexpr (kUnrotated) continue;  // (the gradients are all it reads)
          if constexpr (!kFormQK) {  // (formed: the biases are read where used, from L1 — fewer live registers)
            load_row_h(reinterpret_cast<const uint16_t*>(Q + jr), vq[i]);
            load_row_h(reinterpret_cast<const uint16_t*>(K + jr), vk[i]);
          }
          if constexpr (kPairs == 2 && !kSplit) {  // (S even: both of the lane's pairs rotate, or neither)
            const int64_t at = st * S + n0 / 2;
            float2 v = make_float2(0.0f, 0.0f);
            if (n0 / 2 < S && codes)
              v = make_float2(angle_from_code(codes[at]), angle_from_code(codes[at + 1]));
            else if (n0 / 2 < S)
              v = *reinterpret_cast<const float2*>(phiv + at);
            ph[i][0] = v.x, ph[i][1] = v.y;
          } else {
#pragma unroll
            for (int m = 0; m < kPairs; ++m) {
              const int u = pair(m);
              ph[i][m] = u < S ? angle_at(phiv, codes, st * S + u) : 0.0f;
            }
          }
        }
        float sC[kE] = {}, sB[kE] = {};  // summed over the slot's heads
#pragma unroll
        for (int i = 0; i < kHb; ++i) {
          const int64_t st = (int64_t(b) * d.H + h0 + i) * d.L + t;
          float gc[kE], gb[kE], dp[kPairs];
          // (formed q and k: the head's biases for the lane's elements, one vector load each, read where used — from
          // L1 — to keep registers free)
          float bqv[kE], bkv[kE];
          if constexpr (kFormQK && kSplit) {
#pragma unroll
            for (int m = 0; m < kPairs; ++m)
              if (pair(m) < S) {
                const int64_t bias = int64_t(h0 + i) * N + 2 * pair(m);
                const float2 vc = *reinterpret_cast<const float2*>(p.C_bias + bias);
                const float2 vb = *reinterpret_cast<const float2*>(p.B_bias + bias);
                bqv[2 * m] = vc.x, bqv[2 * m + 1] = vc.y, bkv[2 * m] = vb.x, bkv[2 * m + 1] = vb.y;
              }
          } else if constexpr (kFormQK) {
            if (n0 / 2 < S) {
              const int64_t bias = int64_t(h0 + i) * N + n0;
              load_v(p.C_bias + bias, bqv), load_v(p.B_bias + bias, bkv);
            }
          }
#pragma unroll
          for (int m = 0; m < kPairs; ++m) {
            const int u = pair(m), a = 2 * m;
            float ca = gq[i][a], cb = gq[i][a + 1], ba = gk[i][a], bb = gk[i][a + 1];
            dp[m] = 0.0f;
            if (!kUnrotated && u < S) {
              const float2 rot = rotary_cos_sin(ph[i][m]);
              const float cs = rot.x, sn = rot.y;
              float qa, qb, ka, kb;
              if constexpr (kFormQK) {
                const float2 q2 = __bfloat1622float2(rotated_pair(zc[a], zc[a + 1], bqv[a], bqv[a + 1], cs, sn, true));
                const float2 k2 = __bfloat1622float2(rotated_pair(zb[a], zb[a + 1], bkv[a], bkv[a + 1], cs, sn, true));
                qa = q2.x, qb = q2.y, ka = k2.x, kb = k2.y;
              } else {
                qa = vq[i][a], qb = vq[i][a + 1], ka = vk[i][a], kb = vk[i][a + 1];
              }
              float acc = 0.0f;
              acc += gq[i][a + 1] * qa - gq[i][a] * qb;
              acc += gk[i][a + 1] * ka - gk[i][a] * kb;
              dp[m] = acc;
              ca = gq[i][a] * cs + gq[i][a + 1] * sn, cb = gq[i][a + 1] * cs - gq[i][a] * sn;
              ba = gk[i][a] * cs + gk[i][a + 1] * sn, bb = gk[i][a + 1] * cs - gk[i][a] * sn;
            }
            gc[a] = ca, gc[a + 1] = cb, gb[a] = ba, gb[a + 1] = bb;
          }
          // dφ of the lane's pairs, one store (S even: both or neither rotate)
          if constexpr (!kUnrotated) {
            if (totals)
#pragma unroll
              for (int m = 0; m < kPairs; ++m) dphi_sum[i][m] += dp[m];
          }
          if constexpr (kUnrotated) {
            // (the core wrote dφ)
          } else if constexpr (kSplit) {
#pragma unroll
            for (int m = 0; m < kPairs; ++m)
              if (pair(m) < S) dphi_out[st * S + pair(m)] = dp[m];
          } else if constexpr (kPairs == 2) {
            if (n0 / 2 < S) *reinterpret_cast<float2*>(dphi_out + st * S + n0 / 2) = make_float2(dp[0], dp[1]);
          } else if (n0 / 2 < S) {
            dphi_out[st * S + n0 / 2] = dp[0];
          }
          head_sums(i, gc, gb, sC, sB);
        }
        token_sums(tl, tok, slot, sC, sB);
      }
    if (totals && lane < kLanes)
#pragma unroll
      for (int i = 0; i < kHb; ++i)
#pragma unroll
        for (int m = 0; m < kPairs; ++m)
          if (pair(m) < S) seg_sm[(warp * kHb + i) * S + pair(m)] = dphi_sum[i][m];
    __syncthreads();
    write_bias_partials(p, sm, b, c, h0, kHb, N);
    if (totals) {  // the warps' sums added as the totals kernel adds its phases (warp w: tokens ≡ w mod 8)
      static_assert(kWarps == 8, "eight phases of tokens");
      for (int e = threadIdx.x; e < kHb * S; e += kThreads) {
        const int i = e / S, u = e - i * S;
        const float* w = seg_sm + i * S + u;
        const auto at = [&](int k) { return w[k * kHb * S]; };
        const float sum = ((at(0) + at(1)) + (at(2) + at(3))) + ((at(4) + at(5)) + (at(6) + at(7)));
        p.angle_seg[((int64_t(b) * d.H + h0 + i) * p.nc + c) * S + u] = sum;
      }
    }
    if constexpr (kFuseNorm) {
      __syncthreads();  // the partials read: zero them for the next slot
      for (int e = threadIdx.x; e < kWarps * kHb * 2 * N; e += kThreads) sm[e] = 0.0f;
      __syncthreads();
    }
  }
  if constexpr (kFuseNorm) {
    // bc_norm_backward_kernel's RMSNorm backward per token and vector (B, then C), lane l on elements n ≡ l (mod 32):
    // its expressions and sums, from the slot sums above. The norms' weights in registers, and a token's B and C rows
    // loaded together (one load latency per token: this tail ran ~15 % of the kernel with the rows read per pass).
    constexpr int kV = N / 32;
    float wv[2][kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) wv[0][i] = p.C_normw[lane + 32 * i], wv[1][i] = p.B_normw[lane + 32 * i];
    for (int tl = warp; tl < Tc; tl += kWarps) {
      const int64_t m = int64_t(b) * d.L + c0 + tl;
      float xv[2][kV];
#pragma unroll
      for (int isB = 0; isB < 2; ++isB) {
        const float* x = p.bc_raw + (m * 2 * d.G + (isB ? g : d.G + g)) * N;
#pragma unroll
        for (int i = 0; i < kV; ++i) xv[isB][i] = x[lane + 32 * i];
      }
#pragma unroll
      for (int isB = 1; isB >= 0; --isB) {
        const int off = (isB ? d.off_B : d.off_C) + g * N;
        const float* acc_n = sumCB + (tl * 2 + isB) * N;
        float* part = (isB ? p.part_B_norm : p.part_C_norm) + (m * d.G + g) * N;
        const float* x = xv[isB];
        const float* w = wv[isB];
        float ss = 0;
#pragma unroll
        for (int i = 0; i < kV; ++i) ss += x[i] * x[i];
        const float rstd = 1.0f / sqrtf(warp_sum(ss) / float(N) + kEps);
        float mean = 0;
#pragma unroll
        for (int i = 0; i < kV; ++i) {
          const float acc = acc_n[lane + 32 * i];
          part[lane + 32 * i] = acc * x[i] * rstd;
          mean += acc * w[i] * x[i] * rstd;
        }
        mean = warp_sum(mean) / float(N);
#pragma unroll
        for (int i = 0; i < kV; ++i) {
          const int n = lane + 32 * i;
          const float gx = rstd * (acc_n[n] * w[i] - x[i] * rstd * mean);
          if (p.dzx16) p.dzx16[m * d.din + off + n] = __bfloat16_as_ushort(__float2bfloat16_rn(gx));
          else p.dzx[m * d.din + off + n] = gx;
        }
      }
    }
  }
}

}  // namespace

bool launch_build_siso(cudaStream_t s, const BatchedParams& p) {
  // The cores' shapes and 16-byte-aligned zx rows (its vector loads).
  const MixerDims& d = p.d;
  if (!build_siso_applies(p)) return false;
  const bool full = p.build_fast && d.L % p.T == 0 && p.T % (2 * kWarps) == 0;
  MAMBA3_CHECK(!p.vw_formed || (full && p.zx16), "SISO build: w ⊙ v left to its readers needs whole chunks, bf16 x");
  MAMBA3_CHECK(!p.qk_rotated_only || (full && qk_rotated_only_supported(p)),
               "SISO build: q and k's rotated columns alone need whole chunks and rope_fraction 0.5");
  MAMBA3_CHECK(!p.build_q_only || (full && p.zx16 && p.vw_formed && !p.qk_rotated_only),
               "SISO build: q alone (k and v from the kv chain) needs whole chunks, bf16 x, w ⊙ v left to its readers");
  if (full) {  // the chunk scalars first (batched_build_siso_full_kernel reads w from them)
    const int64_t chunks = int64_t(d.B) * d.H * p.nc;
    launch_train(chunk_scalars_kernel, unsigned((chunks + kWarps - 1) / kWarps), kThreads, 0, s, p);
    MAMBA3_LAUNCH_CHECK();
  }
  const auto run = [&](auto x16) {
    constexpr bool kX16 = decltype(x16)::value;
    const auto go = [&](auto general, auto whole) {
      if (full) launch_per_chunk(whole, s, p, 0);
      else launch_per_chunk(general, s, p, size_t(3 * p.T));
    };
    if constexpr (kX16) {
      if (p.build_q_only) {  // (full: checked above)
        dispatch_core_shape(p, [&](auto n, auto pp) {
          launch_per_chunk(batched_build_siso_full_kernel<decltype(n)::value, decltype(pp)::value, true, true>, s, p,
                           0);
        });
        return;
      }
    }
    if (d.N == 128)
      d.P == 64 ? go(batched_build_siso_kernel<128, 64, kX16>, batched_build_siso_full_kernel<128, 64, kX16>)
                : go(batched_build_siso_kernel<128, 32, kX16>, batched_build_siso_full_kernel<128, 32, kX16>);
    else if (d.N == 64)
      d.P == 64 ? go(batched_build_siso_kernel<64, 64, kX16>, batched_build_siso_full_kernel<64, 64, kX16>)
                : go(batched_build_siso_kernel<64, 32, kX16>, batched_build_siso_full_kernel<64, 32, kX16>);
    else
      d.P == 64 ? go(batched_build_siso_kernel<32, 64, kX16>, batched_build_siso_full_kernel<32, 64, kX16>)
                : go(batched_build_siso_kernel<32, 32, kX16>, batched_build_siso_full_kernel<32, 32, kX16>);
  };
  if (p.zx16) run(std::true_type{});
  else run(std::false_type{});
  return true;
}

}  // namespace mamba3::cuda::train_detail::batched

namespace mamba3::cuda::train_detail {

void launch_chunk_scalars(cudaStream_t s, const BatchedParams& p) {
  MAMBA3_CHECK(batched::build_siso_applies(p) && p.build_fast && p.d.L % p.T == 0 && p.T % (2 * batched::kWarps) == 0,
               "chunk scalars: the SISO full-chunk build's shapes");
  const int64_t chunks = int64_t(p.d.B) * p.d.H * p.nc;
  launch_train(batched::chunk_scalars_kernel, unsigned((chunks + batched::kWarps - 1) / batched::kWarps),
               batched::kThreads, 0, s, p);
  MAMBA3_LAUNCH_CHECK();
}

void launch_build_q_beside(cudaStream_t s, const BatchedParams& p) {
  MAMBA3_CHECK(p.build_q_only && p.q_beside && batched::build_siso_applies(p) && p.zx16 && p.d.L % p.T == 0 &&
                   p.T % (2 * batched::kWarps) == 0,
               "q beside the kv chain: the SISO full-chunk build's shapes, bf16 x");
  dispatch_core_shape(p, [&](auto n, auto pp) {
    batched::launch_per_chunk(batched::build_q_beside_kernel<decltype(n)::value, decltype(pp)::value>, s, p, 0);
  });
}

}  // namespace mamba3::cuda::train_detail

namespace mamba3::cuda::train_detail::batched {

bool launch_output_backward_siso(cudaStream_t s, const BatchedParams& p) {
  if (!output_backward_siso_applies(p)) return false;
  const size_t floats = size_t(kWarps) * (p.d.P + 1);
  const bool two = p.output_tokens != 1;  // (0, unset by a caller: two)
  // Whole chunks in the training step's configuration: the full-chunk kernel (two tokens in flight).
  if (p.output_full && two && p.zx16 && p.dO16 && p.dzx16 && !p.o && !p.o16 && p.d.L % p.T == 0 &&
      p.T % (2 * kWarps) == 0) {
    const auto go = [&](auto zy16) {
      constexpr bool kZ = decltype(zy16)::value;
      const bool norm = p.d.outnorm;
      if (p.d.P == 64)
        launch_per_chunk(norm ? batched_output_backward_siso_full_kernel<64, 2, true, kZ>
                              : batched_output_backward_siso_full_kernel<64, 2, false, kZ>, s, p, floats);
      else
        launch_per_chunk(norm ? batched_output_backward_siso_full_kernel<32, 2, true, kZ>
                              : batched_output_backward_siso_full_kernel<32, 2, false, kZ>, s, p, floats);
    };
    if (p.zy16) go(std::true_type{});
    else go(std::false_type{});
    return true;
  }
  if (p.d.P == 64) {
    launch_per_chunk(two ? batched_output_backward_siso_kernel<64, 2> : batched_output_backward_siso_kernel<64, 1>, s,
                     p, floats);
  } else {
    launch_per_chunk(two ? batched_output_backward_siso_kernel<32, 2> : batched_output_backward_siso_kernel<32, 1>, s,
                     p, floats);
  }
  return true;
}

bool rotation_backward_siso_applies(const BatchedParams& p) {
  const MixerDims& d = p.d;
  return p.siso_kernels && p.bf16 && !d.mimo && (d.N == 32 || d.N == 64 || d.N == 128) && d.S % 2 == 0 &&
         p.heads_per_block >= 1 && p.heads_per_block <= 4;  // (its instances)
}

bool rotation_bc_norm_siso_applies(const BatchedParams& p) {
  // The B/C norm backward inside: its inputs given, the slots' sums of T tokens in shared memory, hb a kernel instance.
  const int hb = p.heads_per_block;
  return rotation_backward_siso_applies(p) && p.bc_raw && p.B_normw && p.C_normw && p.part_B_norm &&
         p.part_C_norm && p.T <= 64 && (p.d.H / p.d.G) % hb == 0;
}

bool rotation_totals_siso_applies(const BatchedParams& p) {
  const int S = p.d.S;
  return rotation_backward_siso_applies(p) && p.angle_seg && !p.dqk_unrotated && !p.d.no_rotary &&
         p.T == kAngleSegment && (S == 16 || S == 32) && S <= p.d.N / 2;
}

bool launch_rotation_backward_siso(cudaStream_t s, const BatchedParams& p_in) {
  if (!rotation_backward_siso_applies(p_in)) return false;
  BatchedParams p = p_in;  // (angle_seg kept only where the kernel's segment sums apply)
  if (!rotation_totals_siso_applies(p)) p.angle_seg = nullptr;
  const MixerDims& d = p.d;
  const int hb = p.heads_per_block;  // (checked by the caller)
  const bool fuse = rotation_bc_norm_siso_applies(p);
  // q and k formed again where the SISO build wrote them (its bits) and the biases' rows are 16-byte aligned.
  const bool form = build_siso_applies(p) && (reinterpret_cast<uintptr_t>(p.C_bias) & 15) == 0 &&
                    (reinterpret_cast<uintptr_t>(p.B_bias) & 15) == 0 && (reinterpret_cast<uintptr_t>(p.zx) & 15) == 0;
  MAMBA3_CHECK(form || !p.qk_rotated_only, "SISO rotation backward: q and k stored in part must be formed again");
  const int64_t blocks = int64_t(d.B) * (fuse ? d.G : d.H / hb) * p.nc;
  const size_t bytes = (size_t(kWarps) * hb * 2 * d.N + (fuse ? size_t(p.T) * 2 * d.N : 0) +
                        (p.angle_seg ? size_t(kWarps) * hb * d.S : 0)) *
                       sizeof(float);
  const auto launch = [&](auto kernel) {
    if (bytes > 48 * 1024)
      MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    launch_train(kernel, unsigned(blocks), kThreads, bytes, s, p);
    MAMBA3_LAUNCH_CHECK();
  };
  const auto with_n = [&](auto form_qk, auto heads, auto fuse_norm, auto unrotated) {
    constexpr bool kF = decltype(form_qk)::value, kFuse = decltype(fuse_norm)::value;
    constexpr bool kU = decltype(unrotated)::value;
    constexpr int kH = decltype(heads)::value;
    // (the L2 prefetch of the warp's next token: p.rotation_prefetch)
    const auto with_prefetch = [&](auto kernel_on, auto kernel_off) {
      launch(p.rotation_prefetch ? kernel_on : kernel_off);
    };
    if constexpr (kF && !kU) {  // (q and k formed from bf16 dQ/dK: the pipelined instance)
      // (its offsets within a slot of hb heads in 32 bits: the dQ16/dK16 rows, the angle rows, the zx rows)
      constexpr int64_t kMax32 = 0x7fffffff;
      const bool offsets_fit = int64_t(hb) * p.nc * p.rows * d.N < kMax32 && int64_t(hb) * d.L * d.S < kMax32 &&
                               int64_t(p.T + kWarps) * d.din < kMax32;
      if (d.N == 128 && d.S <= 32 && p.rotation_prefetch && p.rotation_split && p.rotation_pipe && p.dQ16 &&
          offsets_fit) {
        launch(batched_rotation_backward_siso_kernel<128, kF, kH, kFuse, true, kU, true, true>);
        return;
      }
    }
    if (d.N == 128 && p.rotation_prefetch && p.rotation_split)
      launch(batched_rotation_backward_siso_kernel<128, kF, kH, kFuse, true, kU, true>);
    else if (d.N == 128)
      with_prefetch(batched_rotation_backward_siso_kernel<128, kF, kH, kFuse, true, kU>,
                    batched_rotation_backward_siso_kernel<128, kF, kH, kFuse, false, kU>);
    else if (d.N == 64)
      with_prefetch(batched_rotation_backward_siso_kernel<64, kF, kH, kFuse, true, kU>,
                    batched_rotation_backward_siso_kernel<64, kF, kH, kFuse, false, kU>);
    else
      with_prefetch(batched_rotation_backward_siso_kernel<32, kF, kH, kFuse, true, kU>,
                    batched_rotation_backward_siso_kernel<32, kF, kH, kFuse, false, kU>);
  };
  // the block's slots of hb heads
  const auto with_heads = [&](auto form_qk, auto fuse_norm, auto unrotated) {
    if (hb == 4)
      with_n(form_qk, std::integral_constant<int, 4>{}, fuse_norm, unrotated);
    else if (hb == 3)
      with_n(form_qk, std::integral_constant<int, 3>{}, fuse_norm, unrotated);
    else if (hb == 2)
      with_n(form_qk, std::integral_constant<int, 2>{}, fuse_norm, unrotated);
    else
      with_n(form_qk, std::integral_constant<int, 1>{}, fuse_norm, unrotated);
  };
  if (p.dqk_unrotated) {  // (the fused core un-rotated dQ/dK and wrote dφ)
    MAMBA3_CHECK(fuse && p.dQ16 && p.dK16, "rotation backward: un-rotated dQ/dK need bf16 dQ/dK and the norm inside");
    with_heads(std::false_type{}, std::true_type{}, std::true_type{});
    return true;
  }
  const std::false_type no;
  if (fuse)
    form ? with_heads(std::true_type{}, std::true_type{}, no) : with_heads(no, std::true_type{}, no);
  else
    form ? with_heads(std::true_type{}, no, no) : with_heads(no, no, no);
  return true;
}

}  // namespace mamba3::cuda::train_detail::batched

namespace mamba3::cuda::train_detail {

bool output_backward_siso_applies(const BatchedParams& p) {
  return p.siso_kernels && p.bf16 && !p.d.mimo && (p.d.P == 32 || p.d.P == 64);
}

bool vw_formed_supported(const BatchedParams& p) {
  // The full-chunk build with bf16 x (v = x exactly, so w ⊙ v = bf16(w·v) from v's bits).
  const MixerDims& d = p.d;
  return batched::build_siso_applies(p) && p.build_fast && p.zx16 && !d.mimo && d.L % p.T == 0 &&
         p.T % (2 * batched::kWarps) == 0 && p.rows == p.T && p.T == 64 && p.d.P % 8 == 0;
}

bool qk_rotated_only_supported(const BatchedParams& p) {
  // The full-chunk build (whole chunks: the readers form all 64 rows), rope_fraction 0.5 (the upper half of the state
  // unrotated), the cores' shapes, the compact rows the readers form from (bc_unrot), and the 16-byte alignment of
  // those, zx's rows and the biases that the readers' vector loads and the rotation backward's forming of q and k
  // (which then cannot read them) need.
  const MixerDims& d = p.d;
  return batched::build_siso_applies(p) && batched::rotation_backward_siso_applies(p) && p.build_fast && !d.mimo &&
         !d.no_rotary && 4 * d.S == d.N && d.L % p.T == 0 && p.T % (2 * batched::kWarps) == 0 && p.rows == p.T &&
         p.T == 64 && p.bc_unrot && (reinterpret_cast<uintptr_t>(p.bc_unrot) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(p.zx) & 15) == 0 && (reinterpret_cast<uintptr_t>(p.B_bias) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(p.C_bias) & 15) == 0;
}

void launch_form_vw(cudaStream_t s, const BatchedParams& p) {
  MAMBA3_CHECK(vw_formed_supported(p), "w ⊙ v kernel: unsupported configuration (P {}, L {}, T {})", p.d.P, p.d.L, p.T);
  batched::launch_per_chunk(batched::form_vw_kernel, s, p, 0);
}

void launch_output_dye(cudaStream_t s, const BatchedParams& p) {
  MAMBA3_CHECK(
      output_backward_siso_applies(p) && p.dO16 && p.zx16 && p.d.L % p.T == 0 && p.rows == p.T && p.d.d_inner % 8 == 0,
      "output e^Λ ⊙ dy kernel: unsupported configuration (P {}, L {}, T {})", p.d.P, p.d.L, p.T);
  if (p.d.P == 64)
    batched::launch_per_chunk(batched::output_dye_siso_kernel<64>, s, p, 0);
  else
    batched::launch_per_chunk(batched::output_dye_siso_kernel<32>, s, p, 0);
}

}  // namespace mamba3::cuda::train_detail
