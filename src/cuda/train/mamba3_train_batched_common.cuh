#pragma once
// Shared by the batched path's elementwise chunk kernels (mamba3_train_batched.cu, the generic ones, and
// mamba3_train_siso.cu and mamba3_train_mimo.cu, their SISO and MIMO instances): the block shape, the block's chunk, the chunk scalars both builds form,
// the per-chunk launch, and the SISO instances' launchers (each returns false where its shapes do not apply).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_math.cuh"

namespace mamba3::cuda::train_detail::batched {

constexpr int kThreads = 256, kWarps = kThreads / 32;

// The block's chunk: bh = b·H + h, c, first token c0 and the number of real tokens Tc (the rest is padding).
struct ChunkIndex {
  int64_t chunk, bh;
  int b, h, c, c0, Tc;
  __device__ ChunkIndex(const BatchedParams& p) : ChunkIndex(p, blockIdx.x) {}
  __device__ ChunkIndex(const BatchedParams& p, int64_t chunk_index) {
    chunk = chunk_index, bh = chunk / p.nc, c = int(chunk % p.nc);
    b = int(bh / p.d.H), h = int(bh % p.d.H);
    c0 = c * p.T, Tc = min(p.T, p.d.L - c0);
  }
  // Parameter-partial row (b·nc + c)·H + h.
  __device__ int64_t prow(const BatchedParams& p) const { return (int64_t(b) * p.nc + c) * p.d.H + h; }
};

// Column col (< 2·d_inner: a z or x column) of zx's token row tok, from the bf16 copy where the in_proj wrote one.
__device__ __forceinline__ float zx_col(const BatchedParams& p, int64_t tok, int64_t col) {
  if (p.zx16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.zx16)[tok * 2 * p.d.d_inner + col]);
  return p.zx[tok * p.d.din + col];
}
// dO at flat index i of (M, d_inner), from its bf16 rounding where given.
__device__ __forceinline__ float dO_at(const BatchedParams& p, int64_t i) {
  return p.dO16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.dO16)[i]) : p.dO[i];
}

// Token tl (< Tc) of the chunk: A, dt, γ = λ·dt and scale = λ·dt + (1 − λ_next)·dt_next, with the roundings written
// out (the compiler's choice when this was one expression), so that chunk_scalars_kernel gives the same bits.
__device__ __forceinline__ void chunk_token_scalars(const BatchedParams& p, const ChunkIndex& ix, int tl, float& a,
                                                    float& dt, float& gam, float& scale) {
  const MixerDims& d = p.d;
  const int64_t st = ix.bh * d.L + ix.c0 + tl;
  dt = p.dt[st], a = p.A[st];
  gam = __fmul_rn(p.lam[st], dt);
  const float next = ix.c0 + tl + 1 < d.L ? __fmul_rn(__fsub_rn(1.0f, p.lam[st + 1]), p.dt[st + 1]) : 0.0f;
  scale = __fadd_rn(gam, next);
}

// The chunk scalars (Λ, e^Λ, γ, scale, w, e^{Λ_last}) into p and the block's shared memory (3·T floats); returns w
// per token (shared memory) for w ⊙ v. Every thread of the block calls it (barriers inside).
__device__ __forceinline__ const float* build_chunk_scalars(const BatchedParams& p, const ChunkIndex& ix, float* sm) {
  const int T = p.T;
  float *Lam = sm, *dtv = sm + T, *wv = sm + 2 * T;
  const int64_t cs0 = ix.chunk * T;  // chunk-scalar index of token 0
  for (int tl = threadIdx.x; tl < T; tl += kThreads) {
    float a = 0.0f, dt = 0.0f, gam = 0.0f, scale = 0.0f;
    if (tl < ix.Tc) chunk_token_scalars(p, ix, tl, a, dt, gam, scale);
    Lam[tl] = a, dtv[tl] = dt, wv[tl] = scale;
    p.gam[cs0 + tl] = gam, p.scale[cs0 + tl] = scale;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // Λ in token order, as the CPU sums it (padding adds exact zeros)
    float run = 0.0f;
    for (int tl = 0; tl < T; ++tl) run = __fmaf_rn(Lam[tl], dtv[tl], run), Lam[tl] = run;
    p.decay[ix.chunk] = expf(run);
  }
  __syncthreads();
  const float last = Lam[T - 1];
  for (int tl = threadIdx.x; tl < T; tl += kThreads) {
    const float w = __fmul_rn(expf(__fsub_rn(last, Lam[tl])), wv[tl]);
    p.Lam[cs0 + tl] = Lam[tl], p.eL[cs0 + tl] = expf(Lam[tl]), p.wv[cs0 + tl] = w;
    dtv[tl] = w;  // dtv now holds w
  }
  __syncthreads();
  return dtv;
}


// The rotation backward's bias partials, after a barrier: for each of the block's hb heads the warps' shared rows
// (sm: kWarps × hb × (gC, gB) × RN floats) summed in warp order into part_C_bias and part_B_bias at row
// (b·nc + c)·H + h0 + hh.
__device__ __forceinline__ void write_bias_partials(const BatchedParams& p, const float* sm, int b, int c, int h0,
                                                    int hb, int RN) {
  for (int hh = 0; hh < hb; ++hh) {
    const int64_t prow = (int64_t(b) * p.nc + c) * p.d.H + h0 + hh;
    for (int e = threadIdx.x; e < RN; e += kThreads) {
      float sc = 0.0f, sb = 0.0f;
      for (int w = 0; w < kWarps; ++w) {
        const float* g = sm + (w * hb + hh) * 2 * RN;
        sc += g[e], sb += g[RN + e];
      }
      p.part_C_bias[prow * RN + e] = sc, p.part_B_bias[prow * RN + e] = sb;
    }
  }
}

// The epilogue's per-chunk tail, shared by the generic kernel and the MIMO instance (after every warp has written its
// rdot rows and, for MIMO, its gX rows): ⟨dH, H_c⟩, the serial state-carry terms and dL's reverse cumulative sum
// (thread 0), then dadt, dscale (+=) and the mimo_x partials (summed over the warps in order).
__device__ __forceinline__ void epilogue_state_tail(const BatchedParams& p, const ChunkIndex& ix, const float* Lam,
                                                    float* scale, float* dL, const float* rdot, float* wsum,
                                                    const float* gXall) {
  const MixerDims& d = p.d;
  const int T = p.T, R = d.R, P = d.P, N = d.N, RP = R * P, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  {  // <dH, H_c> over the chunk's P·N (the bf16 mode: from the scans' bf16 states)
    const int64_t PN = int64_t(P) * N, base = ix.chunk * PN;
    float s = 0.0f;
    if (p.Hc16 && p.dHc16) {
      const auto *h16 = static_cast<const __nv_bfloat16*>(p.Hc16) + base,
                 *dh16 = static_cast<const __nv_bfloat16*>(p.dHc16) + base;
      if (PN % 2 == 0)  // pairs: the slots are (P·N)-element aligned
        for (int64_t i = threadIdx.x; i < PN / 2; i += kThreads) {
          const float2 a = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(dh16)[i]),
                       b = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(h16)[i]);
          s += a.x * b.x + a.y * b.y;
        }
      else
        for (int64_t i = threadIdx.x; i < PN; i += kThreads) s += __bfloat162float(dh16[i]) * __bfloat162float(h16[i]);
    } else {
      for (int64_t i = threadIdx.x; i < PN; i += kThreads) s += p.dHc[base + i] * p.Hc[base + i];
    }
    s = warp_sum(s);
    if (lane == 0) wsum[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const float last = Lam[T - 1], elast = p.decay[ix.chunk];
    for (int sl = 0; sl < T; ++sl) {
      float dws = 0.0f;
      for (int r = 0; r < R; ++r) dws += rdot[sl * R + r];
      const float e2 = expf(last - Lam[sl]), G = dws * e2 * scale[sl];
      dL[T - 1] += G;
      dL[sl] -= G;
      scale[sl] = dws * e2;  // scale's gradient from the carried state (scale itself is no longer needed)
    }
    float dot = 0.0f;
    for (int w = 0; w < kWarps; ++w) dot += wsum[w];
    dL[T - 1] += elast * dot;
    float run = 0.0f;  // Λ_t = Σ_{j ≤ t in the chunk} A_j·Δ_j
    for (int tl = T - 1; tl >= 0; --tl) run += dL[tl], dL[tl] = run;
  }
  __syncthreads();
  for (int tl = threadIdx.x; tl < ix.Tc; tl += kThreads) {
    const int64_t st = ix.bh * d.L + ix.c0 + tl;
    p.dadt[st] = dL[tl];
    p.dscale[st] += scale[tl];
  }
  if (d.mimo)
    for (int e = threadIdx.x; e < RP; e += kThreads) {
      float s = 0.0f;
      for (int w = 0; w < kWarps; ++w) s += gXall[w * RP + e];
      p.part_mimo_x[ix.prow(p) * RP + e] = s;
    }
}

// q or k of one rotary pair (elements a, b: adjacent for SISO, the halves' u and u + N/2 for MIMO) as the SISO and
// MIMO builds store them: Rot(c + bias, φ) — or c + bias where the pair does not rotate (past the S rotary pairs) —
// rounded to bf16. The builds and the rotation backwards' recomputation of q and k share it, with explicit roundings
// (no contraction left to the compiler), so they give the same bits.
__device__ __forceinline__ __nv_bfloat162 rotated_pair(float ca, float cb, float bias_a, float bias_b, float cs,
                                                      float sn, bool rot) {
  const float a = __fadd_rn(ca, bias_a), b = __fadd_rn(cb, bias_b);
  if (!rot) return __floats2bfloat162_rn(a, b);
  return __floats2bfloat162_rn(__fmaf_rn(a, cs, -__fmul_rn(b, sn)), __fmaf_rn(a, sn, __fmul_rn(b, cs)));
}

// One block of kThreads per (sequence, head, chunk) with `floats` floats of dynamic shared memory.
template <typename Kernel>
void launch_per_chunk(Kernel kernel, cudaStream_t s, const BatchedParams& p, size_t floats) {
  const int64_t blocks = int64_t(p.d.B) * p.d.H * p.nc;
  MAMBA3_CHECK(blocks <= 0x7fffffff, "batched chunk kernels: {} blocks exceed the grid", blocks);
  const size_t bytes = floats * sizeof(float);
  if (bytes > 48 * 1024)
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  launch_train(kernel, unsigned(blocks), kThreads, bytes, s, p);
  MAMBA3_LAUNCH_CHECK();
}

// The SISO instances (mamba3_train_siso.cu): launched and true where p's shapes take them (p.bf16, SISO, the sizes
// each names), else false with nothing launched.
bool launch_build_siso(cudaStream_t s, const BatchedParams& p);
bool launch_output_backward_siso(cudaStream_t s, const BatchedParams& p);
bool launch_rotation_backward_siso(cudaStream_t s, const BatchedParams& p);
bool rotation_backward_siso_applies(const BatchedParams& p);  // (launch_rotation_backward_siso would launch)
bool rotation_bc_norm_siso_applies(const BatchedParams& p);   // (… with the B/C norm backward inside)
bool rotation_totals_siso_applies(const BatchedParams& p);    // (… writing the angle segment sums into p.angle_seg)
// The MIMO instances of the build, the output stage, the epilogue's state part and the rotation backward
// (mamba3_train_mimo.cu; R ∈ {2, 4}, the cores' shapes),
// likewise.
bool launch_build_mimo(cudaStream_t s, const BatchedParams& p);
bool build_mimo_applies(const BatchedParams& p);  // (launch_build_mimo would launch: q and k are its bits)
bool launch_output_mimo(cudaStream_t s, const BatchedParams& p, bool backward);
bool launch_rotation_backward_mimo(cudaStream_t s, const BatchedParams& p);
bool rotation_backward_mimo_applies(const BatchedParams& p);  // (launch_rotation_backward_mimo would launch)
bool launch_epilogue_mimo(cudaStream_t s, const BatchedParams& p, size_t floats);  // (its state part; floats: smem)
bool epilogue_mimo_instance_applies(const BatchedParams& p);  // (launch_epilogue_mimo would launch)
bool output_mimo_instance_applies(const BatchedParams& p);    // (launch_output_mimo would launch)

}  // namespace mamba3::cuda::train_detail::batched
