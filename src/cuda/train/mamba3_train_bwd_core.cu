// The batched path's backward core (mamba3_train_bwd_core.h): one 128-thread block per (sequence, head, chunk) of 64
// rows, four warps, bf16 m16n8k16 tensor-core products with f32 accumulation.
//   Phase A, warp w on rows t ∈ [16w, 16w + 16): S = q·kᵀ and dW = dy·vᵀ for its rows; coef elementwise (Λ's and γ's
//     row sums); dS = dW ⊙ coef stays in registers as the A operand of dQ = dS·k + (e^Λ ⊙ dy)·H_c.
//   Phase B, warp w on rows s ∈ [16w, 16w + 16): the transposed Sᵀ = k·qᵀ and dWᵀ = v·dyᵀ (so no warp needs another's
//     results); coef elementwise (Λ's and scale's column sums); Wᵀ and dSᵀ in registers as the A operands of
//     dV = Wᵀ·dy and dK = dSᵀ·q.
//   Phase C, warp w on rows p ∈ [16w, 16w + 16): G = (e^Λ ⊙ dy)ᵀ·q.
// Operand tiles in shared memory at a pitch of 8 extra bf16 per row (16 bytes: ldmatrix's eight row addresses fall in
// different banks); loaded with cp.async, 16 bytes per thread and instruction. Results go from the accumulator
// fragments to global memory as float2 stores, bf16 ones 16 bytes per lane (store_tiles_bf16).
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/train/chunk_core_launch.cuh"
#include "cuda/train/chunk_ready.cuh"
#include "cuda/train/mamba3_train_bwd_core.h"
#include "cuda/train/mamba3_train_math.cuh"
#include "cuda/train/mma_bf16.cuh"
#include "cuda/train/qk_unrotated_columns.cuh"

namespace mamba3::cuda::train_detail {

namespace {

constexpr int kRows = kCoreRows;
using namespace mma_bf16;

// ---- The post-scan part (SISO: row = token), shared by the post-scan core and the fused backward core.
// Warp rows t0 … t0 + 15: tp = k·dHᵀ (B[n][p] = dH[p][n]) on tensor cores, then dx = (dV + D·dy) + w ⊙ tp → dzx's x
// columns (and p.dzx16's), Σ_p v·tp → rdot. dv: dV in the accumulator layout; V, dY: the chunk's bf16 rows at pitch ld
// (global or shared memory).
// tp = k·dHᵀ for the warp's rows t0 … t0 + 15 (B[n][p] = dH[p][n]).
template <int N, int P>
__device__ __forceinline__ void post_scan_tp(const bf16* sK, const bf16* sdH, int t0, float (&tp)[P / 8][4]) {
  constexpr int LDN = N + 8;
  zero(tp);
#pragma unroll
  for (int kb = 0; kb < N / 16; ++kb) {
    uint32_t a[4];
    load_a(sK, LDN, t0, 16 * kb, a);
#pragma unroll
    for (int np = 0; np < P / 16; ++np) {
      uint32_t bq[4];
      load_b_nk(sdH, LDN, 16 * np, 16 * kb, bq);
      mma(tp[2 * np], a, bq[0], bq[1]), mma(tp[2 * np + 1], a, bq[2], bq[3]);
    }
  }
}

// The per-token part from tp (post_scan_tp's, in its accumulator layout).
template <int N, int P>
__device__ __forceinline__ void post_scan_rows_tp(const BatchedParams& p, int64_t chunk, int t0,
                                                  const float (&tp)[P / 8][4], const bf16* V, const bf16* dY, int ld,
                                                  const float (&dv)[P / 8][4], float* rdot) {
  const MixerDims& d = p.d;
  const int T = p.T, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int64_t bh = chunk / p.nc;
  const int b = int(bh / d.H), h = int(bh % d.H), c0 = int(chunk % p.nc) * T, Tc = min(T, d.L - c0);
  const float Dh = p.D[h];
  const bool pairs = d.din % 2 == 0 && d.off_x % 2 == 0;  // (col and P even: the pair's address is 4-byte aligned)
  // dzx16's rows 16-byte aligned at the head's x columns: the quad's pairs go out 16 bytes per lane (store_row_pairs).
  const bool wide = p.dzx16 && d.din % 8 == 0 && d.off_x % 8 == 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int tl = t0 + g + 8 * half;
    const float w = p.wv[chunk * T + tl];
    const bool real = tl < Tc;
    const int64_t xcol = (int64_t(b) * d.L + c0 + tl) * d.din + d.off_x + int64_t(h) * P;
    float dot = 0.0f;
    // The row's loads before its stores (see the forward core's output stage).
    float2 vvs[P / 8], dys[P / 8];
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      const int col = nt * 8 + 2 * q;
      vvs[nt] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(V + tl * ld + col));
      dys[nt] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dY + tl * ld + col));
    }
    uint32_t x16[P / 8];  // (wide: the bf16 pairs, stored after the loop)
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      const int col = nt * 8 + 2 * q;
      const float2 dv0 = make_float2(dv[nt][2 * half], dv[nt][2 * half + 1]), vv = vvs[nt], dy = dys[nt];
      const float t_a = tp[nt][2 * half], t_b = tp[nt][2 * half + 1];
      dot += vv.x * t_a, dot += vv.y * t_b;
      const float dx_a = (dv0.x + Dh * dy.x) + w * t_a, dx_b = (dv0.y + Dh * dy.y) + w * t_b;
      x16[nt] = pack(dx_a, dx_b);
      if (real && !wide) {  // dzx rows are din values: an odd din (or x offset) leaves them unaligned for pairs
        if (p.dzx16) {
          __nv_bfloat16* x16p = reinterpret_cast<__nv_bfloat16*>(p.dzx16) + xcol + col;
          if (pairs) *reinterpret_cast<uint32_t*>(x16p) = x16[nt];
          else x16p[0] = __float2bfloat16_rn(dx_a), x16p[1] = __float2bfloat16_rn(dx_b);
        } else {
          p.dzx[xcol + col] = dx_a, p.dzx[xcol + col + 1] = dx_b;
        }
      }
    }
    if (wide) store_row_pairs(x16, reinterpret_cast<__nv_bfloat16*>(p.dzx16) + xcol, real);
    dot = quad_sum(dot);
    if (q == 0) rdot[tl] = dot;
  }
}

template <int N, int P>
__device__ __forceinline__ void post_scan_rows(const BatchedParams& p, int64_t chunk, int t0, const bf16* sK,
                                               const bf16* sdH, const bf16* V, const bf16* dY, int ld,
                                               const float (&dv)[P / 8][4], float* rdot) {
  float tp[P / 8][4];
  post_scan_tp<N, P>(sK, sdH, t0, tp);
  post_scan_rows_tp<N, P>(p, chunk, t0, tp, V, dY, ld, dv, rdot);
}

// ⟨dH, H_c⟩ over the chunk's P·N (dH in shared memory at pitch N + 8, H_c at pitch ldh): the warps' sums → wsum.
template <int N, int P>
__device__ __forceinline__ void post_scan_state_dot(const bf16* sdH, const bf16* hc, int ldh, float* wsum) {
  constexpr int LDN = N + 8;
  float sacc = 0.0f;
  for (int i = threadIdx.x; i < P * N / 2; i += kCoreThreads) {
    const int e = 2 * i, pr = e / N, n = e % N;
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sdH + pr * LDN + n)),
                 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(hc + pr * ldh + n));
    sacc += a.x * c.x + a.y * c.y;
  }
  sacc = warp_sum(sacc);
  if (threadIdx.x % 32 == 0) wsum[threadIdx.x / 32] = sacc;
}

// The state-carry terms per token, by the block's kThreads threads (the exponentials in parallel): rdot (Σ_p v·tp) is
// overwritten with Λ's term G = rdot·e^{Λ_last − Λ}·scale, scale with the scale gradient's term rdot·e^{Λ_last − Λ}.
// Each product rounded on its own (no contraction into the serial sums below).
template <int kThreads>
__device__ __forceinline__ void post_scan_carry_terms(int T, const float* Lam, float* scale, float* rdot) {
  const float last = Lam[T - 1];
  for (int sl = threadIdx.x; sl < T; sl += kThreads) {
    const float e = __fmul_rn(rdot[sl], expf(last - Lam[sl]));
    rdot[sl] = __fmul_rn(e, scale[sl]);
    scale[sl] = e;
  }
}

// The epilogue's last part (after post_scan_carry_terms), by warp 0: Λ's terms into dL (−G at each token, ΣG at the
// last), the state read's term at the last token, then dL's reverse cumulative sum. Lane l holds tokens 2l and 2l + 1
// (T ≤ kCoreRows = 64): the sums are butterfly and shuffle scans of fixed order, where one thread walked the tokens
// twice (~2·64 dependent shared-memory steps) while every other warp waited at the barrier.
static_assert(kRows <= 64, "post_scan_warp: two tokens per lane");
__device__ __forceinline__ void post_scan_warp(const BatchedParams& p, int64_t chunk, int T, float* dL,
                                               const float* G, const float* wsum) {
  const int lane = threadIdx.x % 32, t0 = 2 * lane, t1 = t0 + 1;
  const float g0 = t0 < T ? G[t0] : 0.0f, g1 = t1 < T ? G[t1] : 0.0f;
  float d0 = t0 < T ? dL[t0] - g0 : 0.0f, d1 = t1 < T ? dL[t1] - g1 : 0.0f;
  const float gsum = warp_sum(g0 + g1);
  float dot = 0.0f;
  for (int w = 0; w < kCoreWarps; ++w) dot += wsum[w];
  const float carry = gsum + p.decay[chunk] * dot;  // added to the last token's entry
  if (t0 == T - 1) d0 += carry;
  if (t1 == T - 1) d1 += carry;
  // Reverse inclusive scan over the lanes' pair sums: after it, run = Σ over lanes ≥ l.
  float run = d0 + d1;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float up = __shfl_down_sync(0xffffffffu, run, off);
    if (lane + off < 32) run += up;
  }
  float after = __shfl_down_sync(0xffffffffu, run, 1);  // Σ over lanes > l
  if (lane == 31) after = 0.0f;
  const float e1 = d1 + after;
  if (t1 < T) dL[t1] = e1;
  if (t0 < T) dL[t0] = d0 + e1;
}

// MIMO's state core with p.epilogue_in_core, rows s0 … s0 + 15 (row j is token j / R): the epilogue's per-row terms
// from tp in registers — dv = (dV + D·dy) + w ⊙ tp (the epilogue's expression, the same bits) in place, and
// Σ_p v·tp per row (the lanes' columns, then the quad) into rdot.
template <int P, int kR>
__device__ __forceinline__ void fold_state_rows(const BatchedParams& p, int64_t chunk, int s0,
                                                const float (&tp)[P / 8][4], const bf16* sV, const bf16* sdY, int ld,
                                                float (&dv)[P / 8][4], float* rdot) {
  const int R = kR > 0 ? kR : p.d.R, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const float Dh = p.D[int((chunk / p.nc) % p.d.H)];
  float dot[2] = {0.0f, 0.0f};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = s0 + g + 8 * half;
    const float w = p.wv[chunk * p.T + j / R];
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      const int col = nt * 8 + 2 * q;
      const float2 vv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sV + j * ld + col)),
                   dy = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sdY + j * ld + col));
      const float t_a = tp[nt][2 * half], t_b = tp[nt][2 * half + 1];
      dot[half] += vv.x * t_a, dot[half] += vv.y * t_b;
      dv[nt][2 * half] = (dv[nt][2 * half] + Dh * dy.x) + w * t_a;
      dv[nt][2 * half + 1] = (dv[nt][2 * half + 1] + Dh * dy.y) + w * t_b;
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float d = quad_sum(dot[half]);
    if (q == 0) rdot[s0 + g + 8 * half] = d;
  }
}

// The rest of MIMO's epilogue state part in the state core (p.epilogue_in_core), after the block's last barrier
// (every tile is dead). The chunk's x rows are requested first (one round trip: with kR fixed, a thread's share in
// registers) and each token's G = (Σ_r Σ_p v·tp)·e^{Λ_last − Λ}·scale formed in parallel; the phase-B
// warps' dv rows (do_b: rows s0 … s0 + 15 in the accumulator layout) go to shared memory at pitch P + 4 in the
// tiles' place, the x rows after them. Then per (token, channel) dx = Σ_r dv·mimo_x (ranks in order, the epilogue's
// expression) → dzx's x columns; per (rank, channel) the mimo_x partial over the real tokens in order; thread 0's
// state-carry chain over the G in token order and dL's reverse sum (the epilogue tail's sequence of operations, with
// the first four warps' ⟨dH, H_c⟩ in wsum); dadt and dscale = the core's term + the carried one. dL holds dΛ with the
// core's terms for every token of the chunk, dsc_core the core's dscale terms.
template <int P, int kR, int kThreads>
__device__ __forceinline__ void mimo_epilogue_in_core(const BatchedParams& p, int64_t chunk, bool do_b, int s0,
                                                      const float (&dv)[P / 8][4], unsigned char* tiles,
                                                      const float* Lam, float* scale, float* dL, const float* dsc_core,
                                                      const float* rdot, const float* wsum) {
  constexpr int LDV = P + 4;
  // In the dead tiles: dv rows, then x rows and the tokens' G (at most kRows / 2 tokens each: R ≥ 2; CoreSmem checks).
  float* sDv = reinterpret_cast<float*>(tiles);
  float *sX = sDv + kRows * LDV, *g_tok = sX + kRows / 2 * P;
  const MixerDims& d = p.d;
  const int R = kR > 0 ? kR : d.R, T = p.T, RP = R * P, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int64_t bh = chunk / p.nc;
  const int b = int(bh / d.H), h = int(bh % d.H), c = int(chunk % p.nc), c0 = c * T, Tc = min(T, d.L - c0);
  const int64_t x0 = (int64_t(b) * d.L + c0) * d.din + d.off_x + int64_t(h) * P;  // dzx's (and zx's) x columns
  // With kR fixed the chunk has kRows / kR tokens and each thread kX of its (token, channel) pairs.
  constexpr int kTokens = kRows / (kR > 0 ? kR : 1), kX = kR > 0 ? kTokens * P / kThreads : 1;
  static_assert(kR == 0 || kTokens * P % kThreads == 0, "mimo_epilogue_in_core: whole shares of x");
  float xr[kX];
  if constexpr (kR > 0) {
#pragma unroll
    for (int i = 0; i < kX; ++i) {
      const int e = threadIdx.x + i * kThreads, tl = e / P;
      xr[i] = tl < Tc ? p.zx[x0 + int64_t(tl) * d.din + e % P] : 0.0f;
    }
  }
  const float last = Lam[T - 1];
  for (int sl = threadIdx.x; sl < T; sl += kThreads) {
    float dws = 0.0f;
    for (int r = 0; r < R; ++r) dws += rdot[sl * R + r];
    const float e2 = expf(last - Lam[sl]);
    g_tok[sl] = dws * e2 * scale[sl];
    scale[sl] = dws * e2;  // scale's gradient from the carried state (scale itself is no longer needed)
  }
  if (do_b) {
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int nt = 0; nt < P / 8; ++nt)
        *reinterpret_cast<float2*>(sDv + (s0 + g + 8 * half) * LDV + nt * 8 + 2 * q) =
            make_float2(dv[nt][2 * half], dv[nt][2 * half + 1]);
  }
  __syncthreads();
  const float* mx = p.mimo_x + int64_t(h) * RP;
  const auto dx_at = [&](int e, float x) {
    const int tl = e / P, col = e % P;
    sX[e] = x;
    float dx = 0.0f;
    for (int r = 0; r < R; ++r) dx += sDv[(tl * R + r) * LDV + col] * mx[r * P + col];
    if (tl < Tc) {
      const int64_t xi = x0 + int64_t(tl) * d.din + col;
      if (p.dzx16) reinterpret_cast<bf16*>(p.dzx16)[xi] = __float2bfloat16_rn(dx);
      else p.dzx[xi] = dx;
    }
  };
  if constexpr (kR > 0) {
#pragma unroll
    for (int i = 0; i < kX; ++i) dx_at(threadIdx.x + i * kThreads, xr[i]);
  } else {
    for (int e = threadIdx.x; e < T * P; e += kThreads) {
      const int tl = e / P;
      dx_at(e, tl < Tc ? p.zx[x0 + int64_t(tl) * d.din + e % P] : 0.0f);
    }
  }
  __syncthreads();
  const int64_t prow = (int64_t(b) * p.nc + c) * d.H + h;
  for (int e = threadIdx.x; e < RP; e += kThreads) {
    const int r = e / P, col = e % P;
    float s = 0.0f;
    for (int tl = 0; tl < Tc; ++tl) s += sDv[(tl * R + r) * LDV + col] * sX[tl * P + col];
    p.part_mimo_x[prow * RP + e] = s;
  }
  if (threadIdx.x == 0) {
    for (int sl = 0; sl < T; ++sl) dL[T - 1] += g_tok[sl], dL[sl] -= g_tok[sl];
    float dot = 0.0f;
    for (int w = 0; w < kCoreWarps; ++w) dot += wsum[w];
    dL[T - 1] += p.decay[chunk] * dot;
    float run = 0.0f;  // Λ_t = Σ_{j ≤ t in the chunk} A_j·Δ_j
    for (int tl = T - 1; tl >= 0; --tl) run += dL[tl], dL[tl] = run;
  }
  __syncthreads();
  for (int tl = threadIdx.x; tl < Tc; tl += kThreads) {
    const int64_t st = bh * d.L + c0 + tl;
    p.dadt[st] = dL[tl];
    p.dscale[st] = dsc_core[tl] + scale[tl];
  }
}

// ---- The fused core with p.dqk_unrotated (SISO; fused_core_unrotate_supported): dQ and dK leave the core taken back
// through the rotation — the gradients of the head's biased normalised C and B, Rot(−φ)·dQ and Rot(−φ)·dK — and dφ is
// formed here, where the rotation backward did both from the bf16 dQ/dK it read. A lane's accumulator pair (columns
// 8·nt + 2q and 8·nt + 2q + 1 of one row) is one rotary pair (2i, 2i + 1), i = 4·nt + q, so the un-rotation and the
// pair's dφ term are in-thread; every rotating column lies in the first NB-column pass (2S ≤ NB).

// φ of the thread's pairs, rows r0 + g and r0 + g + 8 of the chunk (0 where the pair does not rotate or the row is
// past the sequence).
template <int NBT>
__device__ __forceinline__ void load_pair_angles(const BatchedParams& p, int64_t chunk, int r0, float (&ph)[NBT][2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4, S = p.d.S;
  const int64_t bh = chunk / p.nc;
  const int c0 = int(chunk % p.nc) * p.T, Tc = min(p.T, p.d.L - c0);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + g + 8 * half;
    const bool real = row < Tc;
    const int64_t src = (bh * p.d.L + c0 + (real ? row : 0)) * S;
#pragma unroll
    for (int nt = 0; nt < NBT; ++nt) {
      const int i = 4 * nt + q;
      ph[nt][half] = real && i < S ? angle_at(p.phi, p.phi_code, src + i) : 0.0f;
    }
  }
}

// acc (the first pass's finished dQ or dK, rows r0 … r0 + 15) un-rotated in place, and each pair's dφ term
// g_b·x_a − g_a·x_b (x: the rotated operand's row, q for dQ and k for dK, in shared memory at pitch ldx; the rotation
// backward's expressions) into the warp's exchange rows xq (16 rows of S floats at pitch S + 4, so that the eight rows
// a store instruction touches fall in different banks): phase A stores its q terms, phase B adds its k terms to them
// — (0 + q term) + k term, the rotation backward's sum.
template <int NBT, bool kAdd>
__device__ __forceinline__ void unrotate_pairs(float (&acc)[NBT][4], const float (&ph)[NBT][2], const bf16* sX, int ldx,
                                               int r0, int S, float* xq) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + g + 8 * half;
#pragma unroll
    for (int nt = 0; nt < NBT; ++nt) {
      const int i = 4 * nt + q;
      if (i < S) {
        const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sX + row * ldx + 2 * i));
        const float2 rot = rotary_cos_sin(ph[nt][half]);
        const float ga = acc[nt][2 * half], gb = acc[nt][2 * half + 1];
        const float term = gb * x.x - ga * x.y;
        float* e = xq + (g + 8 * half) * (S + 4) + i;
        if constexpr (kAdd)
          *e = *e + term;
        else
          *e = term;
        acc[nt][2 * half] = ga * rot.x + gb * rot.y;
        acc[nt][2 * half + 1] = gb * rot.x - ga * rot.y;
      }
    }
  }
}

// The warp's 16 rows of dφ (xq, pitch S + 4) to p.dphi: consecutive tokens of one sequence and head, one contiguous
// range there (S a multiple of 4: fused_core_unrotate_supported).
__device__ __forceinline__ void store_dphi_rows(const BatchedParams& p, int64_t chunk, int r0, const float* xq) {
  const int lane = threadIdx.x % 32, S = p.d.S, S4 = S / 4;
  const int64_t bh = chunk / p.nc;
  const int c0 = int(chunk % p.nc) * p.T, Tc = min(p.T, p.d.L - c0);
  const int n = max(0, min(16, Tc - r0)) * S4;  // float4s of the real rows
  float* dst = p.dphi + (bh * p.d.L + c0 + r0) * S;
  for (int e = lane; e < n; e += 32) {
    const int row = e / S4, col = 4 * (e % S4);
    *reinterpret_cast<float4*>(dst + row * S + col) = *reinterpret_cast<const float4*>(xq + row * (S + 4) + col);
  }
}

// Named barrier 1 + wq between phase A's warp wq and its phase-B partner (64 threads): the first arrives (its stores
// to shared memory performed for the partner first), the second waits. Immediate ids: with an id in a register ptxas
// reserves all sixteen of the block's barriers.
template <bool kArrive, int kId>
__device__ __forceinline__ void pair_barrier_at() {
  if constexpr (kArrive)
    asm volatile("bar.arrive %0, 64;" ::"n"(kId) : "memory");
  else
    asm volatile("bar.sync %0, 64;" ::"n"(kId) : "memory");
}
template <bool kArrive>
__device__ __forceinline__ void pair_barrier(int wq) {
  if (wq == 0)
    pair_barrier_at<kArrive, 1>();
  else if (wq == 1)
    pair_barrier_at<kArrive, 2>();
  else if (wq == 2)
    pair_barrier_at<kArrive, 3>();
  else
    pair_barrier_at<kArrive, 4>();
}

// Named barriers 5 (phase A's four warps) and 6 (phase B's) of the 8-warp block (kStaged).
template <bool kPhaseA>
__device__ __forceinline__ void phase_barrier() {
  if constexpr (kPhaseA)
    asm volatile("bar.sync 5, %0;" ::"n"(kCoreThreads) : "memory");
  else
    asm volatile("bar.sync 6, %0;" ::"n"(kCoreThreads) : "memory");
}

// ---- kHeadSum (p.dqk_head_sum, on top of kUnrot; fused_core_head_sum_supported): the sum over a B/C group's heads
// that the rotation backward ran, done by clusters of 8 head blocks of one (sequence, chunk) (grid order (b, chunk,
// head), head fastest). Each block has written its un-rotated bf16 dQ/dK tile; after a cluster barrier block r adds
// rows 8r … 8r + 7 of the cluster's 8 tiles in head order and writes them as slot h / 8 of dCn/dBn ((token, H/8, N),
// what bc_norm_backward_kernel sums over a group's slots), and forms its own head's bias partials from its tile;
// after a second barrier each block drops its tiles' lines from L2 (discard: no write-back), so that when they are
// still there the tiles never reach DRAM.

// Every thread of the cluster's blocks: their global stores before it are visible to every block after it.
__device__ __forceinline__ void cluster_barrier() {
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}

template <int N, int kThreads>
__device__ __forceinline__ void head_sum_epilogue(const BatchedParams& p, int64_t chunk, float* scratch) {
  const MixerDims& d = p.d;
  constexpr int64_t kTile = int64_t(kRows) * N;  // a chunk's dQ (or dK) tile, bf16
  const int64_t bh = chunk / p.nc;
  const int b = int(bh / d.H), h = int(bh % d.H), c = int(chunk % p.nc), c0 = c * p.T, Tc = min(p.T, d.L - c0);
  const int rank = h % 8, h0 = h - rank, slots = d.H / 8;
  const __nv_bfloat16 *q16 = reinterpret_cast<const __nv_bfloat16*>(p.dQ16),
                      *k16 = reinterpret_cast<const __nv_bfloat16*>(p.dK16);
  // The head's bias partials: its tiles' column sums over the real rows (the block's own stores, visible after the
  // block barriers that ended its phases) — eight groups of eight rows by separate threads, so that their loads are
  // in flight together, then the groups in order through `scratch` (8 × 2N floats in the dead operand tiles).
#pragma unroll
  for (int e0 = 0; e0 < 8 * 2 * N; e0 += kThreads) {
    const int e = e0 + threadIdx.x;
    if (e < 8 * 2 * N) {
      const int grp = e / (2 * N), col = e % (2 * N), n = col % N;
      const __nv_bfloat16* src = (col >= N ? k16 : q16) + chunk * kTile + n;
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = 8 * grp + i;
        if (r < Tc) sum += __bfloat162float(src[int64_t(r) * N]);
      }
      scratch[e] = sum;
    }
  }
  __syncthreads();
  const int64_t prow = (int64_t(b) * p.nc + c) * d.H + h;
  for (int col = threadIdx.x; col < 2 * N; col += kThreads) {
    float sum = 0.0f;
    for (int grp = 0; grp < 8; ++grp) sum += scratch[grp * 2 * N + col];
    (col >= N ? p.part_B_bias : p.part_C_bias)[prow * N + col % N] = sum;
  }
  cluster_barrier();
  // Rows 8·rank … 8·rank + 7 over the cluster's heads h0 … h0 + 7, in head order.
  for (int e = threadIdx.x; e < 2 * 8 * N; e += kThreads) {
    const bool isB = e >= 8 * N;
    const int row = 8 * rank + (e % (8 * N)) / N, n = e % N;
    if (row >= Tc) continue;
    const __nv_bfloat16* src = (isB ? k16 : q16) + int64_t(row) * N + n;
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) sum += __bfloat162float(src[((int64_t(b) * d.H + h0 + k) * p.nc + c) * kTile]);
    const int64_t tok = int64_t(b) * d.L + c0 + row;
    (isB ? p.dBn : p.dCn)[(tok * slots + h0 / 8) * N + n] = sum;
  }
  cluster_barrier();                            // (every block of the cluster has read the tiles)
  constexpr int kLines = int(kTile * 2 / 128);  // 128-byte lines per tile (tiles are 4 KB multiples)
  for (int i = threadIdx.x; i < 2 * kLines; i += kThreads) {
    const char* tile = reinterpret_cast<const char*>((i < kLines ? q16 : k16) + chunk * kTile);
    const size_t line = __cvta_generic_to_global(tile + int64_t(i % kLines) * 128);
    asm volatile("discard.global.L2 [%0], 128;" ::"l"(line) : "memory");
  }
}

template <int N, int P>
struct CoreSmem {
  static constexpr int LDN = N + 8, LDP = P + 8;
  static constexpr size_t bf16_elems = size_t(2 * kRows + P) * LDN + size_t(3 * kRows) * LDP;
  // mimo_epilogue_in_core's dv rows (f32 at pitch P + 4), x rows and G (at most kRows / 2 tokens: R ≥ 2) in the tiles.
  static_assert(size_t(kRows) * (P + 4) * 4 + size_t(kRows / 2) * (P + 1) * 4 <= bf16_elems * sizeof(bf16),
                "mimo_epilogue_in_core: the dv and x rows must fit in the dead tiles");
  __host__ __device__ static constexpr size_t bytes(int T) {
    return bf16_elems * sizeof(bf16) + size_t(3 * T + 4 * kRows) * 4;
  }
  // The fused core's extra tiles after those (16-byte aligned): dH (P × N) and w ⊙ v (rows × P) in bf16, then the
  // post-scan part's floats: dL (T), the core's dscale terms (T), Σ_p v·tp per row, ⟨dH, H_c⟩ per warp; then (kOut)
  // Λ's state-read term per row and D's partial per warp of the 8-warp block.
  __host__ __device__ static constexpr size_t post_offset(int T) { return (bytes(T) + 15) / 16 * 16; }
  static constexpr size_t post_bytes(int T) {
    return post_offset(T) + (size_t(P) * LDN + size_t(kRows) * LDP) * sizeof(bf16) +
           size_t(2 * T + kRows + kCoreWarps + kRows + 2 * kCoreWarps) * 4;
  }
};

// ---- The output stage's backward inside the fused core (kOut; fused_core_output_supported: SISO, whole chunks, no
// output norm, y in bf16 from the forward core, z, dO and dzx in bf16). The dy and e^Λ ⊙ dy tiles arrive as dO's and
// z's rows; before the products every thread takes 16-byte pieces (8 channels of a token) and forms dy and e^Λ ⊙ dy in
// place (the output-stage backward's expressions: its bits), dz → dzx16's z columns, D's partial Σ dy·v → wD per
// warp, and the w ⊙ v tile from v (scale_pair's bits: the build's; no Vw read). Λ's state-read term e^Λ·Σ_p dy·Z is
// formed in phase A as Σ_n q·((e^Λ ⊙ dy)·H_c) from dQ's state term (no Z: the forward core writes none where this
// part is expected, p.z_unread). So dy and e^Λ ⊙ dy never go through global memory and the output-stage kernel does
// not run. Λ's term, D's partial and dQ (its two terms in the other order) move by rounding against the kernel path.
// The pieces' e^Λ, w and y, requested before the block awaits its tiles.
template <int P, int kThreads>
struct CoreOutputRows {
  static constexpr int kPer = 8, kPieces = kRows * P / kPer, kIters = kPieces / kThreads;
  static_assert(kPieces % kThreads == 0 && kThreads % (P / kPer) == 0, "whole passes, whole rows per warp");
  float e[kIters], w[kIters];
  uint4 y[kIters];
  __device__ __forceinline__ static int row(int j) { return (int(threadIdx.x) + j * kThreads) / (P / kPer); }
  __device__ __forceinline__ static int col(int j) { return (int(threadIdx.x) + j * kThreads) % (P / kPer) * kPer; }
  __device__ __forceinline__ void issue(const BatchedParams& p, int64_t chunk) {
#pragma unroll
    for (int j = 0; j < kIters; ++j) {
      const int64_t i = (chunk * kRows + row(j)) * P + col(j);
      e[j] = p.eL[chunk * p.T + row(j)], w[j] = p.wv[chunk * p.T + row(j)];
      y[j] = *reinterpret_cast<const uint4*>(reinterpret_cast<const bf16*>(p.WV) + i);
    }
  }
};

template <int P, int kThreads>
__device__ __forceinline__ void core_output_part(const BatchedParams& p, int64_t chunk,
                                                 const CoreOutputRows<P, kThreads>& in, bf16* sdY, bf16* sdYe,
                                                 const bf16* sV, bf16* sVw, int ld, float* wD) {
  using R = CoreOutputRows<P, kThreads>;
  const MixerDims& d = p.d;
  const int64_t bh = chunk / p.nc, tok0 = bh / d.H * d.L + chunk % p.nc * p.T;
  const int lane = threadIdx.x % 32;
  float gD = 0.0f;
#pragma unroll
  for (int j = 0; j < R::kIters; ++j) {
    const int r = R::row(j), c = R::col(j), i = r * ld + c;
    const uint4 ov = *reinterpret_cast<const uint4*>(sdY + i), zv = *reinterpret_cast<const uint4*>(sdYe + i);
    const uint4 vv = *reinterpret_cast<const uint4*>(sV + i);
    const bf16 *ob = reinterpret_cast<const bf16*>(&ov), *zb = reinterpret_cast<const bf16*>(&zv);
    const bf16* yb = reinterpret_cast<const bf16*>(&in.y[j]);
    const bf16* vb = reinterpret_cast<const bf16*>(&vv);
    uint4 dyv, dyev, vwv;
    bf16 *dyb = reinterpret_cast<bf16*>(&dyv), *dyeb = reinterpret_cast<bf16*>(&dyev);
    __nv_bfloat162 dz[R::kPer / 2];
#pragma unroll
    for (int k = 0; k < R::kPer; k += 2) {
      float g2[2];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const SisoGateGrad gg =
            siso_gate_backward(__bfloat162float(ob[k + m]), __bfloat162float(zb[k + m]), __bfloat162float(yb[k + m]));
        g2[m] = gg.dz;
        dyb[k + m] = __float2bfloat16_rn(gg.dyn), dyeb[k + m] = __float2bfloat16_rn(__fmul_rn(in.e[j], gg.dyn));
        gD = __fmaf_rn(gg.dyn, __bfloat162float(vb[k + m]), gD);
      }
      dz[k / 2] = __floats2bfloat162_rn(g2[0], g2[1]);
    }
    const uint32_t* vu = reinterpret_cast<const uint32_t*>(&vv);
    uint32_t* vwu = reinterpret_cast<uint32_t*>(&vwv);
#pragma unroll
    for (int k = 0; k < 4; ++k) vwu[k] = scale_pair(vu[k], in.w[j], in.w[j]);
    *reinterpret_cast<uint4*>(sdY + i) = dyv, *reinterpret_cast<uint4*>(sdYe + i) = dyev;
    *reinterpret_cast<uint4*>(sVw + i) = vwv;
    // (dzx16's rows: pitch din, even: 4-byte stores)
    __nv_bfloat162* dzr =
        reinterpret_cast<__nv_bfloat162*>(reinterpret_cast<bf16*>(p.dzx16) + (tok0 + r) * d.din + bh % d.H * P + c);
#pragma unroll
    for (int k = 0; k < R::kPer / 2; ++k) dzr[k] = dz[k];
  }
  gD = warp_sum(gD);
  if (lane == 0) wD[threadIdx.x / 32] = gD;
}

// kPost (SISO, the reverse state chain run before it): also the post-scan core's work (below) from the chunk's dH
// (dHc16) — dK's second term added to the first in the accumulators, tp = k·dHᵀ, and the epilogue's state part with
// dV kept in registers — so dV and dK's first term never go through global memory and q, k, v, dy and H_c are read
// once for both. Every sum runs in the two kernels' orders: the same bits (test FusedBackwardCoreGivesTheSplitBits).
// kMode: kCoreOnly (the core above), kCoreFused (kPost) or kCoreStates (MIMO, the reverse chain run before it: dK's
// second term in the same accumulators, as kPost, and tp = k·dHᵀ instead of the batched products tp and
// dK += (w ⊙ v)·dH; with p.epilogue_in_core the MIMO epilogue's state part from tp and dV in registers
// (fold_state_rows, mimo_epilogue_in_core), else tp and dV written for the epilogue kernel).
// kWarps = 8 (with dH only): phase A on warps 0–3 and phase B on warps 4–7 at the same time (they read only the
// shared tiles and write disjoint outputs), twice the warps in flight for the same arithmetic (the same bits).
enum CoreMode { kCoreOnly = 0, kCoreFused = 1, kCoreStates = 2 };
// kR: the rank when fixed at compile time (1 for the fused core, 2 or 4 for MIMO's state core; 0: p.d.R).
// kQk: q and k stored in their rotated half (p.qk_rotated_only), the fused core forming the rest (an instance of its
// own, so that the others' code is as it was).
// Block i's chunk with the chunks taken last to first over all sequence-heads (kBeside, below).
__device__ __forceinline__ int64_t chunk_last_first(const BatchedParams& p) {
  const int64_t bhs = int64_t(p.d.B) * p.d.H, i = blockIdx.x, bh = i % bhs, c = p.nc - 1 - i / bhs;
  return bh * p.nc + c;
}

// kBeside (the fused core with the output part, p.chain_ready): launched while the reverse chain runs, the blocks take
// the chunks last to first (all sequence-heads' last chunks, then the ones before: the order the chain stores their
// dH in) and wait for each chunk's counter before copying its dH tile (chunk_ready.cuh).
template <int N, int P, int kMode, int kWarps, int kR, bool kUnrot = false, bool kHeadSum = false, bool kOut = false,
          bool kQk = false, bool kBeside = false, bool kStaged = false>
__device__ __forceinline__ void backward_core_body(const BatchedParams& p, const bf16* Hc16, float* g_slots,
                                                   const bf16* dHc16) {
  constexpr int kThreads = 32 * kWarps;
  constexpr bool kSplitPhases = kWarps == 2 * kCoreWarps;
  constexpr bool kPost = kMode == kCoreFused, kWithDH = kMode != kCoreOnly;
  static_assert(kWarps == kCoreWarps || (kSplitPhases && kWithDH), "8 warps only for the cores with dH");
  static_assert(!kUnrot || kPost, "un-rotated dQ/dK only from the fused core");
  static_assert(!kHeadSum || kUnrot, "the head sum reads un-rotated dQ/dK");
  static_assert(!kOut || (kPost && kSplitPhases && !kUnrot), "the output part: the 8-warp fused core");
  using Smem = CoreSmem<N, P>;
  constexpr int LDN = Smem::LDN, LDP = Smem::LDP, NS = kRows / 8;  // NS: n-tiles over the chunk's 64 rows
  constexpr int NB = N < 64 ? N : 64, NBT = NB / 8;                  // dQ/dK/G columns per pass, their n-tiles
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16 *sK = sQ + kRows * LDN, *sH = sK + kRows * LDN, *sV = sH + P * LDN, *sdY = sV + kRows * LDP,
       *sdYe = sdY + kRows * LDP;
  const int T = p.T, R = p.d.R;
  float* Lam = reinterpret_cast<float*>(sdYe + kRows * LDP);
  float *scale = Lam + T, *gam = scale + T, *rowG = gam + T, *rowD = rowG + kRows, *colG = rowD + kRows,
        *colE = colG + kRows;
  bf16* sdH = reinterpret_cast<bf16*>(smem_raw + Smem::post_offset(T));  // kPost only, like the four below
  bf16* sVw = sdH + P * LDN;
  float* dL = reinterpret_cast<float*>(sVw + kRows * LDP);
  float *dsc_core = dL + T, *rdot = dsc_core + T, *wsum = rdot + kRows, *dLo = wsum + kCoreWarps, *wD = dLo + kRows;
  // (the head-fastest order also where the core forms q's and k's unrotated half: a chunk's heads read the same
  // bc_unrot rows close together in time)
  static_assert(!kBeside || (kOut && !kQk && !kHeadSum), "beside the chain: the output part's instance");
  static_assert(!kStaged || (kOut && kSplitPhases && !kQk && !kHeadSum), "staged tiles: the output part's instance");
  const int64_t chunk = kBeside                                ? chunk_last_first(p)
                        : kHeadSum || (kQk && p.qk_head_order) ? head_fastest_chunk(p)
                                                               : int64_t(blockIdx.x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  // The phases this warp runs and its 16-row block in them.
  const bool do_a = !kSplitPhases || warp < kCoreWarps, do_b = !kSplitPhases || warp >= kCoreWarps;
  const int wq = warp % kCoreWarps;

  // (p.qk_rotated_only, the fused core: q's and k's rotated columns from Q and K, the others formed from bc_unrot)
  static_assert(!kQk || kPost, "q and k in part only for the fused core");
  constexpr bool qk_half = kQk;
  [[maybe_unused]] UnrotatedColumns<N, kThreads, 2> unrot;
  if (qk_half) unrot.issue(p, chunk, {true, false});  // (first: its loads ahead of the copies in the memory pipe)
  copy_qk_tiles<kThreads, N, qk_half>(sQ, sK, LDN, p, chunk);
  if constexpr (!kStaged) copy_tile<kThreads, P, N>(sH, LDN, Hc16 + chunk * P * N);
  copy_tile<kThreads, kRows, P>(sV, LDP, static_cast<const bf16*>(p.V) + chunk * kRows * P);
  [[maybe_unused]] CoreOutputRows<P, kThreads> out_rows;
  if constexpr (kOut) {  // dO's and z's rows into the dy and e^Λ ⊙ dy tiles (core_output_part turns them)
    const MixerDims& d = p.d;
    const int64_t bh = chunk / p.nc, tok0 = bh / d.H * d.L + chunk % p.nc * T, col = bh % d.H * P;
    copy_tile<kThreads, kRows, P>(sdY, LDP, reinterpret_cast<const bf16*>(p.dO16) + tok0 * d.d_inner + col,
                                  int(d.d_inner));
    copy_tile<kThreads, kRows, P>(sdYe, LDP, reinterpret_cast<const bf16*>(p.zx16) + tok0 * 2 * d.d_inner + col,
                                  int(2 * d.d_inner));
    out_rows.issue(p, chunk);
  } else {
    copy_tile<kThreads, kRows, P>(sdY, LDP, static_cast<const bf16*>(p.dY) + chunk * kRows * P);
    copy_tile<kThreads, kRows, P>(sdYe, LDP, static_cast<const bf16*>(p.dYe) + chunk * kRows * P);
  }
  if constexpr (kWithDH && !kStaged) {
    if constexpr (kBeside) {  // (the other tiles' copies in flight meanwhile)
      if (threadIdx.x == 0) chunk_ready_wait(p.chain_ready + chunk, p.chain_ready_target);
      __syncthreads();
    }
    copy_tile<kThreads, P, N>(sdH, LDN, dHc16 + chunk * P * N);
  }
  if constexpr (kWithDH) {
    // (kOut: the w ⊙ v tile formed from v by core_output_part, scale_pair's bits: the build's; no Vw read)
    if constexpr (!kOut) copy_tile<kThreads, kRows, P>(sVw, LDP, static_cast<const bf16*>(p.Vw) + chunk * kRows * P);
  }
  // The chunk's Λ, scale and γ with the tiles (16 bytes a copy): loaded into registers and stored, each thread's
  // stores had waited on its loads — 1.6 % of the fused core's stall samples (ncu, 125M on an H100).
  const bool scalars_async = T % 4 == 0 && 3 * (T / 4) <= kThreads;
  if (scalars_async && int(threadIdx.x) < 3 * (T / 4)) {
    const int which = int(threadIdx.x) / (T / 4), j = 4 * (int(threadIdx.x) % (T / 4));
    const float* src = which == 0 ? p.Lam : which == 1 ? p.scale : p.gam;  // (a select: no local memory)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(Lam + which * T + j)),
                 "l"(src + chunk * T + j));
  }
  asm volatile("cp.async.commit_group;");
  // kStaged: the state tiles in a second group of copies that only their phase's warps issue and wait for — H_c by
  // phase A's warps (first read by dQ's state term), dH by phase B's (first read by dK's second term) — so that the
  // barrier below waits for the other tiles alone and the state tiles arrive during the first products. Beside the
  // chain, phase B's first thread waits for dH's counter (phase B's barrier then orders its warps' copies after it).
  if constexpr (kStaged) {
    if (do_a) {
      copy_tile_by<kCoreThreads, P, N>(int(threadIdx.x) % kCoreThreads, sH, LDN, Hc16 + chunk * P * N);
    } else {
      if constexpr (kBeside) {
        if (threadIdx.x == kCoreThreads) chunk_ready_wait(p.chain_ready + chunk, p.chain_ready_target);
        phase_barrier<false>();
      }
      copy_tile_by<kCoreThreads, P, N>(int(threadIdx.x) % kCoreThreads, sdH, LDN, dHc16 + chunk * P * N);
    }
    asm volatile("cp.async.commit_group;");
  }
  for (int tl = threadIdx.x; !scalars_async && tl < T; tl += kThreads) {
    const int64_t i = chunk * T + tl;
    Lam[tl] = p.Lam[i], scale[tl] = p.scale[i], gam[tl] = p.gam[i];
  }
  // (with the output part, the formed half is stored after the first barrier, beside that pass and before its
  // barrier: off the copies' critical path, which it had lengthened by ~10 %)
  if (qk_half && !kOut) unrot.store({sQ, sK}, LDN);
  if constexpr (kStaged)
    asm volatile("cp.async.wait_group 1;" ::: "memory");
  else
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  __syncthreads();
  if constexpr (kOut) {
    core_output_part<P, kThreads>(p, chunk, out_rows, sdY, sdYe, sV, sVw, LDP, wD);
    if (qk_half) unrot.store({sQ, sK}, LDN);
    __syncthreads();
  }

  // coef(t, s) of spec §5.3 for chunk rows j (t's row) and jj (s's row), with its two gradient weights: G = gc·coef
  // below the token diagonal (Λ_t +, Λ_s −) and on it gc itself (γ_t); E = gc·e^{Λ_t − Λ_s} (scale_s).
  static_assert(!kPost || kR == 1, "the fused core is SISO's");
  const auto coef = [&](int j, int jj, float& ex) { return chunk_coef<kR>(Lam, scale, gam, R, j, jj, ex); };
  // Blocks of 16 rows × 16 columns across the causal diagonal from the warp's rows have coef 0 (S, dW and the products
  // with W, dS add exact zeros there): skipped where the rank allows it. Phase A: columns s after rows t (block > wq);
  // phase B: columns t before rows s (block < wq).
  constexpr bool kSkip = causal_blocks_skippable<kR>();
  const auto after_rows = [&](int blk) { return kSkip && blk > wq; };
  const auto before_rows = [&](int blk) { return kSkip && blk < wq; };

  float dv_keep[P / 8][4];  // (kCoreStates with p.epilogue_in_core: phase B's finished dv, for after the last barrier)
  // ---- Phase A: rows t of this warp.
  if (do_a) {
    const int t0 = 16 * wq;
    float s[NS][4], dw[NS][4];
    zero(s), zero(dw);
    // (the k-step loops whose step indexes no register array are rolled here and in phase B: 6 % less code for a
    // kernel whose warps stalled 14 % of their samples on instruction fetch, and room for the scalars' copies without
    // spills — ncu on an H100, fifty-ninth session)
#pragma unroll 1
    for (int kb = 0; kb < N / 16; ++kb) {
      uint32_t a[4];
      load_a(sQ, LDN, t0, 16 * kb, a);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        if (after_rows(np)) continue;
        uint32_t b[4];
        load_b_nk(sK, LDN, 16 * np, 16 * kb, b);
        mma(s[2 * np], a, b[0], b[1]), mma(s[2 * np + 1], a, b[2], b[3]);
      }
    }
#pragma unroll 1
    for (int kb = 0; kb < P / 16; ++kb) {
      uint32_t a[4];
      load_a(sdY, LDP, t0, 16 * kb, a);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        if (after_rows(np)) continue;
        uint32_t b[4];
        load_b_nk(sV, LDP, 16 * np, 16 * kb, b);
        mma(dw[2 * np], a, b[0], b[1]), mma(dw[2 * np + 1], a, b[2], b[3]);
      }
    }
    float rg[2] = {0.0f, 0.0f}, rd[2] = {0.0f, 0.0f};
    if constexpr (kR == 1) {  // (chunk_coef<1>'s values from registers, no per-element branches)
      const SisoCoefRowsT rows(Lam, gam, t0, g);
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) {
        if (after_rows(nt / 2)) continue;  // (dS stays 0)
        const int sc = nt * 8 + 2 * q;
        float cf[4], ex[4];
        rows.tile(Lam, scale, sc, cf, ex);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const float gc = dw[nt][e] * s[nt][e];
          if (ex[e] != 0.0f) rg[half] += gc * cf[e];
          else if (sc + e % 2 == rows.t[half]) rd[half] += gc;
          dw[nt][e] *= cf[e];  // dS
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2, j = t0 + g + 8 * half, jj = nt * 8 + 2 * q + e % 2;
          float ex;
          const float cf = coef(j, jj, ex), gc = dw[nt][e] * s[nt][e];
          if (ex != 0.0f) rg[half] += gc * cf;
          else if (jj / R == j / R) rd[half] += gc;
          dw[nt][e] *= cf;  // dS
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float gsum = quad_sum(rg[half]), dsum = quad_sum(rd[half]);
      if (q == 0) rowG[t0 + g + 8 * half] = gsum, rowD[t0 + g + 8 * half] = dsum;
    }
    uint32_t ds[NS / 2][4];  // dS as A fragments, one per 16 columns s
#pragma unroll
    for (int kb = 0; kb < NS / 2; ++kb) {
      ds[kb][0] = pack(dw[2 * kb][0], dw[2 * kb][1]), ds[kb][1] = pack(dw[2 * kb][2], dw[2 * kb][3]);
      ds[kb][2] = pack(dw[2 * kb + 1][0], dw[2 * kb + 1][1]), ds[kb][3] = pack(dw[2 * kb + 1][2], dw[2 * kb + 1][3]);
    }
    if constexpr (kStaged) {  // H_c's copies (phase A's own group) complete and seen by the phase's warps
      asm volatile("cp.async.wait_group 0;" ::: "memory");
      phase_barrier<true>();
    }
    // dQ = dS·k + (e^Λ ⊙ dy)·H_c, NB columns at a time.
    float* dQ = p.dQ + chunk * kRows * N;
    // kOut: Λ's state-read term e^Λ·Σ_p dy·Z = Σ_n q·((e^Λ ⊙ dy)·H_c) for rows t0 + g and t0 + g + 8, from dQ's
    // state term (formed first in kOut) and the q tile: no Z read, and the forward core writes none (p.z_unread).
    [[maybe_unused]] float lam_dot[2] = {0.0f, 0.0f};
    const auto ds_k = [&](float(&acc)[NBT][4], int n0) {  // acc += dS·k
#pragma unroll
      for (int kb = 0; kb < NS / 2; ++kb) {
        if (after_rows(kb)) continue;
#pragma unroll
        for (int np = 0; np < NBT / 2; ++np) {
          uint32_t b[4];
          load_b_kn(sK, LDN, 16 * kb, n0 + 16 * np, b);
          mma(acc[2 * np], ds[kb], b[0], b[1]), mma(acc[2 * np + 1], ds[kb], b[2], b[3]);
        }
      }
    };
    // kUnrot: the passes last to first, so that the rotating one (the first) ends the warp's reads of its e^Λ ⊙ dy
    // rows, which then hold its dφ q terms for phase B (no one else reads them).
#pragma unroll
    for (int pass = 0; pass < N / NB; ++pass) {
      const int n0 = kUnrot ? N - NB - pass * NB : pass * NB;
      float acc[NBT][4];
      zero(acc);
      if constexpr (!kOut) ds_k(acc, n0);
#pragma unroll 1
      for (int kb = 0; kb < P / 16; ++kb) {
        uint32_t a[4];
        load_a(sdYe, LDP, t0, 16 * kb, a);
#pragma unroll
        for (int np = 0; np < NBT / 2; ++np) {
          uint32_t b[4];
          load_b_kn(sH, LDN, 16 * kb, n0 + 16 * np, b);
          mma(acc[2 * np], a, b[0], b[1]), mma(acc[2 * np + 1], a, b[2], b[3]);
        }
      }
      if constexpr (kOut) {
#pragma unroll
        for (int nt = 0; nt < NBT; ++nt) {
          const int col = n0 + 8 * nt + 2 * q;
          const float2 qa = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sQ + (t0 + g) * LDN + col));
          const float2 qb = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sQ + (t0 + g + 8) * LDN + col));
          lam_dot[0] = __fmaf_rn(acc[nt][1], qa.y, __fmaf_rn(acc[nt][0], qa.x, lam_dot[0]));
          lam_dot[1] = __fmaf_rn(acc[nt][3], qb.y, __fmaf_rn(acc[nt][2], qb.x, lam_dot[1]));
        }
        ds_k(acc, n0);
      }
      if constexpr (kUnrot)
        if (n0 == 0) {  // (the angles requested after the products: held across them, the 8-warp block spilled)
          float ph[NBT][2];
          load_pair_angles<NBT>(p, chunk, t0, ph);
          __syncwarp();  // (the warp's reads of its e^Λ ⊙ dy rows are done)
          unrotate_pairs<NBT, false>(acc, ph, sQ, LDN, t0, p.d.S, reinterpret_cast<float*>(sdYe + t0 * LDP));
        }
      if (p.dQ16) store_tiles_bf16(acc, p.dQ16 + chunk * kRows * N, N, t0, n0);
      else store_tiles(acc, dQ, N, t0, n0);
    }
    if constexpr (kUnrot && kSplitPhases) {  // the q terms are there for the phase-B partner
      __syncwarp();
      pair_barrier<true>(wq);
    }
    if constexpr (kOut) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float sum = quad_sum(lam_dot[half]);
        if (q == 0) dLo[t0 + g + 8 * half] = sum;
      }
    }
  }

  // ---- Phase B: rows s of this warp (the transposed products).
  if (do_b) {
    const int s0 = 16 * wq;
    float st[NS][4], dwt[NS][4];
    zero(st), zero(dwt);
#pragma unroll 1
    for (int kb = 0; kb < N / 16; ++kb) {
      uint32_t a[4];
      load_a(sK, LDN, s0, 16 * kb, a);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        if (before_rows(np)) continue;
        uint32_t b[4];
        load_b_nk(sQ, LDN, 16 * np, 16 * kb, b);
        mma(st[2 * np], a, b[0], b[1]), mma(st[2 * np + 1], a, b[2], b[3]);
      }
    }
#pragma unroll 1
    for (int kb = 0; kb < P / 16; ++kb) {
      uint32_t a[4];
      load_a(sV, LDP, s0, 16 * kb, a);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        if (before_rows(np)) continue;
        uint32_t b[4];
        load_b_nk(sdY, LDP, 16 * np, 16 * kb, b);
        mma(dwt[2 * np], a, b[0], b[1]), mma(dwt[2 * np + 1], a, b[2], b[3]);
      }
    }
    float cg[2] = {0.0f, 0.0f}, ce[2] = {0.0f, 0.0f};
    if constexpr (kR == 1) {  // (chunk_coef<1>'s values from registers, no per-element branches)
      const int sr[2] = {s0 + g, s0 + g + 8};
      const float ls[2] = {Lam[sr[0]], Lam[sr[1]]}, ss[2] = {scale[sr[0]], scale[sr[1]]};
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) {
        if (before_rows(nt / 2)) continue;  // (Wᵀ and dSᵀ stay 0)
        const int tc = nt * 8 + 2 * q;
        const float lt[2] = {Lam[tc], Lam[tc + 1]}, gt[2] = {gam[tc], gam[tc + 1]};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          float ex;
          const float cf = siso_coef(lt[e % 2], gt[e % 2], ls[half], ss[half], tc + e % 2, sr[half], ex),
                      gc = dwt[nt][e] * st[nt][e];
          if (ex != 0.0f) cg[half] += gc * cf, ce[half] += gc * ex;
          st[nt][e] *= cf;   // Wᵀ
          dwt[nt][e] *= cf;  // dSᵀ
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2, jj = s0 + g + 8 * half, j = nt * 8 + 2 * q + e % 2;
          float ex;
          const float cf = coef(j, jj, ex), gc = dwt[nt][e] * st[nt][e];
          if (ex != 0.0f) cg[half] += gc * cf, ce[half] += gc * ex;
          st[nt][e] *= cf;   // Wᵀ
          dwt[nt][e] *= cf;  // dSᵀ
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float gsum = quad_sum(cg[half]), esum = quad_sum(ce[half]);
      if (q == 0) colG[s0 + g + 8 * half] = gsum, colE[s0 + g + 8 * half] = esum;
    }
    uint32_t wt[NS / 2][4], dst[NS / 2][4];
#pragma unroll
    for (int kb = 0; kb < NS / 2; ++kb) {
      wt[kb][0] = pack(st[2 * kb][0], st[2 * kb][1]), wt[kb][1] = pack(st[2 * kb][2], st[2 * kb][3]);
      wt[kb][2] = pack(st[2 * kb + 1][0], st[2 * kb + 1][1]), wt[kb][3] = pack(st[2 * kb + 1][2], st[2 * kb + 1][3]);
      dst[kb][0] = pack(dwt[2 * kb][0], dwt[2 * kb][1]), dst[kb][1] = pack(dwt[2 * kb][2], dwt[2 * kb][3]);
      dst[kb][2] = pack(dwt[2 * kb + 1][0], dwt[2 * kb + 1][1]);
      dst[kb][3] = pack(dwt[2 * kb + 1][2], dwt[2 * kb + 1][3]);
    }
    float dv[P / 8][4];  // dV = Wᵀ·dy (kPost: kept for the epilogue's state part)
    zero(dv);
#pragma unroll
    for (int kb = 0; kb < NS / 2; ++kb) {
      if (before_rows(kb)) continue;
#pragma unroll
      for (int np = 0; np < P / 16; ++np) {
        uint32_t b[4];
        load_b_kn(sdY, LDP, 16 * kb, 16 * np, b);
        mma(dv[2 * np], wt[kb], b[0], b[1]), mma(dv[2 * np + 1], wt[kb], b[2], b[3]);
      }
    }
    if constexpr (!kPost) {  // (kCoreStates with p.epilogue_in_core: dv is finished after dK, below)
      if (kMode != kCoreStates || !p.epilogue_in_core) store_tiles(dv, p.dV + chunk * kRows * P, P, s0, 0);
    }
    float* dK = p.dK + chunk * kRows * N;
    if constexpr (kStaged) {  // dH's copies (phase B's own group) complete and seen by the phase's warps
      asm volatile("cp.async.wait_group 0;" ::: "memory");
      phase_barrier<false>();
    }
    // dK = dSᵀ·q; kUnrot: the passes last to first, so that the rotating one (the first) ends the loop and meets
    // phase A's dφ terms as late as possible.
#pragma unroll
    for (int pass = 0; pass < N / NB; ++pass) {
      const int n0 = kUnrot ? N - NB - pass * NB : pass * NB;
      float acc[NBT][4];
      zero(acc);
#pragma unroll
      for (int kb = 0; kb < NS / 2; ++kb) {
        if (before_rows(kb)) continue;
#pragma unroll
        for (int np = 0; np < NBT / 2; ++np) {
          uint32_t b[4];
          load_b_kn(sQ, LDN, 16 * kb, n0 + 16 * np, b);
          mma(acc[2 * np], dst[kb], b[0], b[1]), mma(acc[2 * np + 1], dst[kb], b[2], b[3]);
        }
      }
      if constexpr (kWithDH) {  // dK += (w ⊙ v)·dH, continuing the same accumulators (the post-scan core's order)
#pragma unroll 1
        for (int kb = 0; kb < P / 16; ++kb) {
          uint32_t a[4];
          load_a(sVw, LDP, s0, 16 * kb, a);
#pragma unroll
          for (int np = 0; np < NBT / 2; ++np) {
            uint32_t bq[4];
            load_b_kn(sdH, LDN, 16 * kb, n0 + 16 * np, bq);
            mma(acc[2 * np], a, bq[0], bq[1]), mma(acc[2 * np + 1], a, bq[2], bq[3]);
          }
        }
      }
      // dK is finished here with dH (kCoreFused, kCoreStates; kCoreOnly's goes on to the post-scan core).
      if constexpr (kUnrot)
        if (n0 == 0) {       // dφ = (0 + q term) + k term in the exchange rows
          float ph[NBT][2];  // (the rows phase A's partner read: likely in L1)
          load_pair_angles<NBT>(p, chunk, s0, ph);
          if constexpr (kSplitPhases)
            pair_barrier<false>(wq);
          else
            __syncwarp();
          unrotate_pairs<NBT, true>(acc, ph, sK, LDN, s0, p.d.S, reinterpret_cast<float*>(sdYe + s0 * LDP));
        }
      if (kWithDH && p.dK16) store_tiles_bf16(acc, p.dK16 + chunk * kRows * N, N, s0, n0);
      else store_tiles(acc, dK, N, s0, n0);
      if constexpr (kUnrot)
        if (n0 == 0) {  // the warp's rows of dφ out
          __syncwarp();
          store_dphi_rows(p, chunk, s0, reinterpret_cast<const float*>(sdYe + s0 * LDP));
        }
    }
    if constexpr (kPost) post_scan_rows<N, P>(p, chunk, s0, sK, sdH, sV, sdY, LDP, dv, rdot);
    if constexpr (kMode == kCoreStates) {  // tp for the MIMO epilogue, where the batched product wrote it
      float tp[P / 8][4];
      post_scan_tp<N, P>(sK, sdH, s0, tp);
      if (p.epilogue_in_core) {
        fold_state_rows<P, kR>(p, chunk, s0, tp, sV, sdY, LDP, dv, rdot);
#pragma unroll
        for (int nt = 0; nt < P / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) dv_keep[nt][e] = dv[nt][e];
      } else {
        store_tiles(tp, p.Z + chunk * kRows * P, P, s0, 0);
      }
    }
  }

  // ---- Phase C: G = (e^Λ ⊙ dy)ᵀ·q, rows p of this warp (not with the reverse state chain, which forms G itself).
  // (never with kUnrot: e^Λ ⊙ dy's rows hold dφ terms by then)
  for (int p0 = 16 * warp; !kUnrot && g_slots && p0 < P; p0 += 16 * kCoreWarps) {
    float* G = g_slots + chunk * P * N;
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += NB) {
      float acc[NBT][4];
      zero(acc);
#pragma unroll
      for (int kb = 0; kb < NS / 2; ++kb) {
        uint32_t a[4];
        load_a_t(sdYe, LDP, 16 * kb, p0, a);
#pragma unroll
        for (int np = 0; np < NBT / 2; ++np) {
          uint32_t b[4];
          load_b_kn(sQ, LDN, 16 * kb, n0 + 16 * np, b);
          mma(acc[2 * np], a, b[0], b[1]), mma(acc[2 * np + 1], a, b[2], b[3]);
        }
      }
      store_tiles(acc, G, N, p0, n0);
    }
  }

  // ⟨dH, H_c⟩ by the first four warps, as in the post-scan core (its sum order); also for MIMO's epilogue in the core.
  // (kStaged: after the barrier below, where phase B's dH copies are seen by phase A's warps)
  if (!kStaged && (kPost || (kMode == kCoreStates && p.epilogue_in_core))) {
    if (threadIdx.x < kCoreThreads) post_scan_state_dot<N, P>(sdH, sH, LDN, wsum);
  }

  // ---- The chunk scalars' gradients from coef, per token (as the coef kernel forms them).
  __syncthreads();
  if constexpr (kStaged) {
    if (threadIdx.x < kCoreThreads) post_scan_state_dot<N, P>(sdH, sH, LDN, wsum);
  }
  const int64_t bh = chunk / p.nc;
  const int c0 = int(chunk % p.nc) * T, Tc = min(T, p.d.L - c0);
  const bool epilogue_here = kMode == kCoreStates && p.epilogue_in_core;
  if constexpr (kOut) {
    if (threadIdx.x == 0) {  // D's partial: the warps' sums in order
      float sum = 0.0f;
      for (int w = 0; w < kWarps; ++w) sum += wD[w];
      const MixerDims& d = p.d;
      p.part_D[(bh / d.H * p.nc + chunk % p.nc) * d.H + bh % d.H] = sum;
    }
  }
  for (int tl = threadIdx.x; tl < Tc; tl += kThreads) {
    float dl = 0.0f, dg = 0.0f, dsc = 0.0f;
    for (int r = 0; r < R; ++r) {
      const int j = tl * R + r;
      dl += rowG[j] - colG[j], dg += rowD[j], dsc += colE[j];
    }
    const int64_t st = bh * p.d.L + c0 + tl;
    if (kPost || epilogue_here) {
      dL[tl] = (kOut ? dLo[tl] : p.dLam[chunk * T + tl]) + dl;
      dsc_core[tl] = dsc;
      p.dgam[st] = dg;
    } else {
      p.dLam[chunk * T + tl] += dl;
      p.dgam[st] = dg, p.dscale[st] = dsc;
    }
  }
  if constexpr (kMode == kCoreStates) {
    if (epilogue_here) {
      for (int tl = Tc + threadIdx.x; tl < T; tl += kThreads) dL[tl] = p.dLam[chunk * T + tl];
      mimo_epilogue_in_core<P, kR, kThreads>(p, chunk, do_b, 16 * wq, dv_keep, smem_raw, Lam, scale, dL, dsc_core,
                                             rdot, wsum);
    }
  }
  if constexpr (kPost) {
    for (int tl = Tc + threadIdx.x; tl < T; tl += kThreads) dL[tl] = kOut ? dLo[tl] : p.dLam[chunk * T + tl];
    post_scan_carry_terms<kThreads>(T, Lam, scale, rdot);  // (rdot and scale: complete since the barrier above)
    __syncthreads();
    if (threadIdx.x < 32) {  // (warp 0 alone from here: a warp barrier, not a block one)
      post_scan_warp(p, chunk, T, dL, rdot, wsum);
      __syncwarp();
      for (int tl = threadIdx.x; tl < Tc; tl += 32) {
        const int64_t st = bh * p.d.L + c0 + tl;
        p.dadt[st] = dL[tl];
        p.dscale[st] = dsc_core[tl] + scale[tl];
      }
    }
  }
  // (the operand tiles are dead: the block's phases ended at the barriers above, and warp 0's tail reads only the
  // scalars' floats)
  if constexpr (kHeadSum) head_sum_epilogue<N, kThreads>(p, chunk, reinterpret_cast<float*>(smem_raw));
}

template <int N, int P, int kMode, int kR, bool kUnrot = false, bool kQk = false>
__global__ void __launch_bounds__(kCoreThreads)
    backward_core_kernel(const BatchedParams p, const bf16* Hc16, float* g_slots, const bf16* dHc16) {
  pdl_wait();
  backward_core_body<N, P, kMode, kCoreWarps, kR, kUnrot, false, false, kQk>(p, Hc16, g_slots, dHc16);
}

// The cores with dH with their phases on separate warps: 256 threads, at most 128 registers so that two blocks share
// an SM.
template <int N, int P, int kMode, int kR, bool kUnrot = false, bool kHeadSum = false, bool kOut = false,
          bool kQk = false, bool kStaged = false>
__global__ void __launch_bounds__(2 * kCoreThreads, 2)
    fused_core_wide_kernel(const BatchedParams p, const bf16* Hc16, const bf16* dHc16) {
  pdl_wait();
  backward_core_body<N, P, kMode, 2 * kCoreWarps, kR, kUnrot, kHeadSum, kOut, kQk, false, kStaged>(p, Hc16, nullptr,
                                                                                                   dHc16);
}

// The 8-warp fused core with the output part beside the reverse chain (p.chain_ready): that chain triggers right after
// its own wait, so this starts while it runs. It reads the chain's dH per chunk once the chunk's counter says it is
// stored, and otherwise only what was complete before the chain began (the forward's tiles, dO, z, the chunk scalars);
// nothing it writes is read by the chain. It waits for the chain before it exits, so the kernels after it, waiting for
// it, also wait for the chain.
template <int N, int P, bool kStaged>
__global__ void __launch_bounds__(2 * kCoreThreads, 2)
    fused_core_beside_kernel(const BatchedParams p, const bf16* Hc16, const bf16* dHc16) {
  pdl_beside();
  backward_core_body<N, P, kCoreFused, 2 * kCoreWarps, 1, false, false, true, false, true, kStaged>(p, Hc16, nullptr,
                                                                                                    dHc16);
  pdl_wait();
}

// The post-scan core (SISO): per chunk, tp = k·dHᵀ and dK += (w ⊙ v)·dH on tensor cores from the scan's bf16 dH, then
// the epilogue's state part from tp in registers: dv = (dV + D·dy) + w ⊙ tp → dx (dzx's x columns and their bf16
// twin), Σ_p v·tp per token, ⟨dH, H_c⟩, and Λ's and scale's state-carry terms (→ dadt, dscale) as the epilogue
// kernel forms them (the parts shared with the fused backward core: post_scan_rows, post_scan_state_dot,
// post_scan_warp).
template <int N, int P>
struct PostSmem {
  static constexpr int LDN = N + 8, LDP = P + 8;
  static constexpr size_t bytes(int T) {
    return (size_t(kRows + P) * LDN + size_t(kRows) * LDP) * sizeof(bf16) + size_t(3 * T + kRows + kCoreWarps) * 4;
  }
};

template <int N, int P>
__global__ void __launch_bounds__(kCoreThreads) post_scan_core_kernel(const BatchedParams p, const bf16* dHc16,
                                                                      const bf16* Hc16) {
  pdl_wait();
  constexpr int LDN = PostSmem<N, P>::LDN, LDP = PostSmem<N, P>::LDP;
  constexpr int NB = N < 64 ? N : 64, NBT = NB / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);
  bf16 *sH = sK + kRows * LDN, *sVw = sH + P * LDN;
  const MixerDims& d = p.d;
  const int T = p.T;
  float* Lam = reinterpret_cast<float*>(sVw + kRows * LDP);
  float *scale = Lam + T, *dL = scale + T, *rdot = dL + T, *wsum = rdot + kRows;
  const int64_t chunk = blockIdx.x, bh = chunk / p.nc;
  const int c0 = int(chunk % p.nc) * T, Tc = min(T, d.L - c0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4, t0 = 16 * warp;

  copy_tile<kCoreThreads, kRows, N>(sK, LDN, static_cast<const bf16*>(p.K) + chunk * kRows * N);
  copy_tile<kCoreThreads, P, N>(sH, LDN, dHc16 + chunk * P * N);
  copy_tile<kCoreThreads, kRows, P>(sVw, LDP, static_cast<const bf16*>(p.Vw) + chunk * kRows * P);
  asm volatile("cp.async.commit_group;");
  for (int tl = threadIdx.x; tl < T; tl += kCoreThreads) {
    const int64_t i = chunk * T + tl;
    Lam[tl] = p.Lam[i], scale[tl] = p.scale[i], dL[tl] = p.dLam[i];
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  __syncthreads();

  // dK += (w ⊙ v)·dH, NB columns at a time (dK's first term from the backward core, read in the fragment layout).
  float* dK = p.dK + chunk * kRows * N;
#pragma unroll
  for (int n0 = 0; n0 < N; n0 += NB) {
    float acc[NBT][4];
#pragma unroll
    for (int nt = 0; nt < NBT; ++nt) {
      const float* src = dK + int64_t(t0 + g) * N + n0 + nt * 8 + 2 * q;
      const float2 lo = *reinterpret_cast<const float2*>(src), hi = *reinterpret_cast<const float2*>(src + 8 * N);
      acc[nt][0] = lo.x, acc[nt][1] = lo.y, acc[nt][2] = hi.x, acc[nt][3] = hi.y;
    }
#pragma unroll
    for (int kb = 0; kb < P / 16; ++kb) {
      uint32_t a[4];
      load_a(sVw, LDP, t0, 16 * kb, a);
#pragma unroll
      for (int np = 0; np < NBT / 2; ++np) {
        uint32_t bq[4];
        load_b_kn(sH, LDN, 16 * kb, n0 + 16 * np, bq);
        mma(acc[2 * np], a, bq[0], bq[1]), mma(acc[2 * np + 1], a, bq[2], bq[3]);
      }
    }
    if (p.dK16) store_tiles_bf16(acc, p.dK16 + chunk * kRows * N, N, t0, n0);
    else store_tiles(acc, dK, N, t0, n0);
  }
  float dv[P / 8][4];  // the backward core's dV in the accumulator layout
  const float* dV = p.dV + chunk * kRows * P;
#pragma unroll
  for (int nt = 0; nt < P / 8; ++nt) {
    const float* src = dV + int64_t(t0 + g) * P + nt * 8 + 2 * q;
    const float2 lo = *reinterpret_cast<const float2*>(src), hi = *reinterpret_cast<const float2*>(src + 8 * P);
    dv[nt][0] = lo.x, dv[nt][1] = lo.y, dv[nt][2] = hi.x, dv[nt][3] = hi.y;
  }
  post_scan_rows<N, P>(p, chunk, t0, sK, sH, static_cast<const bf16*>(p.V) + chunk * kRows * P,
                       static_cast<const bf16*>(p.dY) + chunk * kRows * P, P, dv, rdot);
  post_scan_state_dot<N, P>(sH, Hc16 + chunk * P * N, N, wsum);
  __syncthreads();
  post_scan_carry_terms<kCoreThreads>(T, Lam, scale, rdot);
  __syncthreads();
  if (threadIdx.x >= 32) return;
  post_scan_warp(p, chunk, T, dL, rdot, wsum);  // (warp 0 alone from here: a warp barrier, not a block one)
  __syncwarp();
  for (int tl = threadIdx.x; tl < Tc; tl += 32) {
    const int64_t st = bh * d.L + c0 + tl;
    p.dadt[st] = dL[tl];
    p.dscale[st] += scale[tl];
  }
}

}  // namespace

bool backward_core_supported(const BatchedParams& p) { return core_shape_supported(p); }

void launch_batched_backward_core(cudaStream_t s, const BatchedParams& p, const void* Hc16, float* g_slots) {
  MAMBA3_CHECK(backward_core_supported(p), "backward core: unsupported chunk (bf16 {}, rows {}, N {}, P {})", p.bf16,
               p.rows, p.d.N, p.d.P);
  dispatch_core_shape(p, [&](auto n, auto pp) {
    constexpr int N = decltype(n)::value, P = decltype(pp)::value;
    launch_core(backward_core_kernel<N, P, kCoreOnly, 0>, "backward core", s, p, CoreSmem<N, P>::bytes(p.T), p,
                static_cast<const bf16*>(Hc16), g_slots, static_cast<const bf16*>(nullptr));
  });
}

namespace {
// MAMBA3_TRAIN_FUSED_CORE_WARPS, read once: the fused core's warps per block, 8 (the phases on separate warps, the
// default) or 4; set_fused_core_wide overrides it (process-wide, for the test that compares them).
int g_fused_core_wide = -1;  // -1: from the environment
bool fused_core_wide() {
  if (g_fused_core_wide < 0) g_fused_core_wide = env_choice("MAMBA3_TRAIN_FUSED_CORE_WARPS", {"8", "4"}) != "4";
  return g_fused_core_wide != 0;
}
}  // namespace

void set_fused_core_wide(bool on) { g_fused_core_wide = on ? 1 : 0; }

namespace {
// A core with dH (kCoreFused or kCoreStates) on 4 or 8 warps, with the rank kR fixed at compile time (see
// backward_core_body).
template <int kMode, int kR, bool kUnrot = false, bool kOut = false>
void launch_core_with_dh(cudaStream_t s, const BatchedParams& p, const void* Hc16, const void* dHc16,
                         const char* what) {
  const bool wide = fused_core_wide();
  MAMBA3_CHECK(wide || !kOut, "{}: the output part runs on the 8-warp block only", what);
  // (q and k stored in part: the fused core's instances that form the rest)
  MAMBA3_CHECK(!p.qk_rotated_only || kMode == kCoreFused, "{}: q and k stored in part need the fused core", what);
  dispatch_core_shape(p, [&](auto n, auto pp) {
    constexpr int N = decltype(n)::value, P = decltype(pp)::value;
    const size_t bytes = CoreSmem<N, P>::post_bytes(p.T);
    if (!wide) {
      if constexpr (kOut) return;  // (refused above)
      const auto go = [&](auto kernel) {
        launch_core(kernel, what, s, p, bytes, p, static_cast<const bf16*>(Hc16), static_cast<float*>(nullptr),
                    static_cast<const bf16*>(dHc16));
      };
      if constexpr (kMode == kCoreFused) {
        if (p.qk_rotated_only) return go(backward_core_kernel<N, P, kMode, kR, kUnrot, true>);
      }
      go(backward_core_kernel<N, P, kMode, kR, kUnrot>);
      return;
    }
    auto* kernel = fused_core_wide_kernel<N, P, kMode, kR, kUnrot, false, kOut>;
    if constexpr (kMode == kCoreFused) {
      if (p.qk_rotated_only) kernel = fused_core_wide_kernel<N, P, kMode, kR, kUnrot, false, kOut, true>;
    }
    if constexpr (kOut) {  // (the state tiles in their phases' own copies: p.core_staged, q and k whole)
      if (p.core_staged && !p.qk_rotated_only)
        kernel = fused_core_wide_kernel<N, P, kMode, kR, kUnrot, false, kOut, false, true>;
    }
    if (bytes > 48 * 1024)
      MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    const int64_t blocks = int64_t(p.d.B) * p.d.H * p.nc;
    MAMBA3_CHECK(blocks <= 0x7fffffff, "{}: {} blocks exceed the grid", what, blocks);
    launch_train(kernel, unsigned(blocks), 2 * kCoreThreads, bytes, s, p, static_cast<const bf16*>(Hc16),
                 static_cast<const bf16*>(dHc16));
    MAMBA3_LAUNCH_CHECK();
  });
}
}  // namespace

void launch_batched_backward_fused_core(cudaStream_t s, const BatchedParams& p, const void* Hc16, const void* dHc16) {
  MAMBA3_CHECK(post_scan_core_supported(p), "fused backward core: unsupported chunk (bf16 {}, rows {}, N {}, P {}, R {})",
               p.bf16, p.rows, p.d.N, p.d.P, p.d.R);
  if (p.dqk_head_sum) {
    MAMBA3_CHECK(!p.qk_rotated_only, "fused backward core: the head sum reads q and k whole");
    MAMBA3_CHECK(p.dqk_unrotated && fused_core_head_sum_supported(p),
                 "fused backward core: the head sum unsupported (H {}, G {}, N {}, P {}, S {})", p.d.H, p.d.G, p.d.N,
                 p.d.P, p.d.S);
    dispatch_core_shape(p, [&](auto n, auto pp) {
      constexpr int N = decltype(n)::value, P = decltype(pp)::value;
      auto* kernel = fused_core_wide_kernel<N, P, kCoreFused, 1, true, true>;
      const size_t bytes = CoreSmem<N, P>::post_bytes(p.T);
      if (bytes > 48 * 1024)
        MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
      const int64_t blocks = int64_t(p.d.B) * p.d.H * p.nc;
      MAMBA3_CHECK(blocks <= 0x7fffffff, "fused backward core (head sum): {} blocks exceed the grid", blocks);
      // Clusters of 8 consecutive blocks: the 8 heads of one (sequence, chunk), under PDL as every training kernel.
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(unsigned(blocks));
      config.blockDim = dim3(2 * kCoreThreads);
      config.dynamicSmemBytes = bytes;
      config.stream = s;
      cudaLaunchAttribute attribute[2];
      attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attribute[0].val.programmaticStreamSerializationAllowed = train_pdl_enabled() && pdl_enabled() ? 1 : 0;
      attribute[1].id = cudaLaunchAttributeClusterDimension;
      attribute[1].val.clusterDim.x = 8, attribute[1].val.clusterDim.y = 1, attribute[1].val.clusterDim.z = 1;
      config.attrs = attribute;
      config.numAttrs = 2;
      MAMBA3_CUDA_CHECK(
          cudaLaunchKernelEx(&config, kernel, p, static_cast<const bf16*>(Hc16), static_cast<const bf16*>(dHc16)));
      MAMBA3_LAUNCH_CHECK();
    });
    return;
  }
  if (p.dqk_unrotated) {
    MAMBA3_CHECK(fused_core_unrotate_supported(p),
                 "fused backward core: un-rotated dQ/dK unsupported (N {}, P {}, S {})", p.d.N, p.d.P, p.d.S);
    launch_core_with_dh<kCoreFused, 1, true>(s, p, Hc16, dHc16, "fused backward core (un-rotating)");
    return;
  }
  if (p.core_output) {
    MAMBA3_CHECK(!p.dqk_unrotated && fused_core_output_supported(p),
                 "fused backward core: the output part unsupported (P {}, L {}, T {}, outnorm {})", p.d.P, p.d.L, p.T,
                 p.d.outnorm);
    if (p.chain_ready) {  // beside the reverse chain (the 8-warp instance without q and k in part)
      MAMBA3_CHECK(fused_core_wide() && !p.qk_rotated_only,
                   "fused backward core beside the chain: the 8-warp block with q and k whole");
      dispatch_core_shape(p, [&](auto n, auto pp) {
        constexpr int N = decltype(n)::value, P = decltype(pp)::value;
        auto* kernel = p.core_staged ? fused_core_beside_kernel<N, P, true> : fused_core_beside_kernel<N, P, false>;
        const size_t bytes = CoreSmem<N, P>::post_bytes(p.T);
        if (bytes > 48 * 1024)
          MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
        const int64_t blocks = int64_t(p.d.B) * p.d.H * p.nc;
        MAMBA3_CHECK(blocks <= 0x7fffffff, "fused backward core beside the chain: {} blocks exceed the grid", blocks);
        launch_train(kernel, unsigned(blocks), 2 * kCoreThreads, bytes, s, p, static_cast<const bf16*>(Hc16),
                     static_cast<const bf16*>(dHc16));
        MAMBA3_LAUNCH_CHECK();
      });
      return;
    }
    launch_core_with_dh<kCoreFused, 1, false, true>(s, p, Hc16, dHc16, "fused backward core (with the output part)");
    return;
  }
  launch_core_with_dh<kCoreFused, 1>(s, p, Hc16, dHc16, "fused backward core");
}

bool fused_core_output_may_apply(const BatchedParams& p) {
  // The output-stage backward's full-chunk SISO configuration without the norm (whose arithmetic the core runs), on
  // the 8-warp block; the w ⊙ v tile from v (bf16 x: v = x).
  const MixerDims& d = p.d;
  return post_scan_core_supported(p) && fused_core_wide() && output_backward_siso_applies(p) && p.zy16 && !d.outnorm &&
         p.zx16 && p.rows == kRows && p.T == kRows && d.L % p.T == 0 && d.d_inner % 8 == 0 && d.din % 2 == 0;
}

bool fused_core_beside_supported(const BatchedParams& p) { return fused_core_wide() && !p.qk_rotated_only; }

bool fused_core_output_supported(const BatchedParams& p) {
  return fused_core_output_may_apply(p) && p.dO16 && p.dzx16 && !p.o && !p.o16 && p.part_D;
}

bool fused_core_unrotate_supported(const BatchedParams& p) {
  const MixerDims& d = p.d;
  const int NB = d.N < 64 ? d.N : 64;  // the cores' column pass
  // The rotating columns in the first pass; dφ's exchange rows (16 × (S + 4) floats, 16-byte rows) inside a warp's 16
  // rows of e^Λ ⊙ dy (pitch P + 8 bf16); bf16 dQ/dK, and the rotation backward's instance that reads them so.
  return post_scan_core_supported(p) && !d.no_rotary && d.S > 0 && d.S % 4 == 0 && 2 * d.S <= NB && 2 * d.S <= d.P &&
         p.dQ16 && p.dK16 && (p.phi || p.phi_code) && p.dphi && rotation_backward_reads_unrotated(p);
}

bool fused_core_head_sum_supported(const BatchedParams& p) {
  // Clusters of 8 heads inside one B/C group, the 8-warp block, the slot outputs and bias partials given.
  const MixerDims& d = p.d;
  return fused_core_unrotate_supported(p) && d.H % 8 == 0 && (d.H / d.G) % 8 == 0 && fused_core_wide() && p.dBn &&
         p.dCn && p.part_B_bias && p.part_C_bias;
}

bool backward_state_core_supported(const BatchedParams& p) { return core_shape_supported(p) && p.d.mimo; }

void launch_batched_backward_state_core(cudaStream_t s, const BatchedParams& p, const void* Hc16, const void* dHc16) {
  MAMBA3_CHECK(backward_state_core_supported(p), "backward state core: unsupported chunk (bf16 {}, rows {}, N {}, P {})",
               p.bf16, p.rows, p.d.N, p.d.P);
  MAMBA3_CHECK(p.Z, "backward state core: tp's buffer (p.Z) is null");
  // MIMO's common ranks with R fixed at compile time (chunk_coef's divisions become shifts), others read from p.
  if (p.d.R == 4) launch_core_with_dh<kCoreStates, 4>(s, p, Hc16, dHc16, "backward state core");
  else if (p.d.R == 2) launch_core_with_dh<kCoreStates, 2>(s, p, Hc16, dHc16, "backward state core");
  else launch_core_with_dh<kCoreStates, 0>(s, p, Hc16, dHc16, "backward state core");
}

bool post_scan_core_supported(const BatchedParams& p) { return core_shape_supported(p) && !p.d.mimo; }

void launch_batched_post_scan_core(cudaStream_t s, const BatchedParams& p, const void* dHc16, const void* Hc16) {
  MAMBA3_CHECK(post_scan_core_supported(p), "post-scan core: unsupported chunk (bf16 {}, rows {}, N {}, P {}, R {})",
               p.bf16, p.rows, p.d.N, p.d.P, p.d.R);
  dispatch_core_shape(p, [&](auto n, auto pp) {
    constexpr int N = decltype(n)::value, P = decltype(pp)::value;
    launch_core(post_scan_core_kernel<N, P>, "post-scan core", s, p, PostSmem<N, P>::bytes(p.T), p,
                static_cast<const bf16*>(dHc16), static_cast<const bf16*>(Hc16));
  });
}

}  // namespace mamba3::cuda::train_detail
