// MIMO instances of the batched path's elementwise chunk kernels (mamba3_train_batched_common.cuh): the build, the
// output stage (forward and backward), the epilogue's state part and the rotation backward, with compile-time shapes and the generic kernels' arithmetic (ncu, 125M MIMO
// R = 4 step: the generic build took 1.59 ms per layer for ~1.2 GB of q, k, v and w ⊙ v, a third of the copy rate;
// the output stage 1.1 ms per call, the rotation backward 2.0).
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/pdl.h"
#include "cuda/train/mamba3_train_batched_common.cuh"

namespace mamba3::cuda::train_detail::batched {

namespace {

// The MIMO build for the cores' shapes in the bf16 mode: chunk row j = tl·R + r (token tl, rank r). A warp's rows all
// have one rank (kWarps is a multiple of R), so its B/C biases and mimo_x row stay in registers. MIMO rotates the
// halves (n, n + N/2) of B and C: lane l takes the kU = max(N/64, 1) consecutive slots u = l·kU … and their elements
// a = u, b = u + N/2 (adjacent within each half: paired loads and stores), and P/32 consecutive channels of v. Two
// rows per warp at a time, every load before any store. Per element the generic kernel's expressions: q/k =
// Rot(B/C + bias, φ_u) where u < S, v = mimo_x ⊙ x, w ⊙ v from the same f32 product.
template <int N, int P, int R>
__global__ void __launch_bounds__(kThreads, 4) batched_build_mimo_kernel(const BatchedParams p) {
  pdl_wait();
  static_assert(kWarps % R == 0, "a warp's rows share one rank");
  constexpr int kHalf = N / 2, kU = kHalf >= 64 ? kHalf / 32 : 1, kLanes = kHalf / kU, kC = P / 32, kAhead = 2;
  using bf16 = __nv_bfloat16;
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  extern __shared__ float sm[];
  const float* wts = build_chunk_scalars(p, ix, sm);  // w per token
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = warp % R, u0 = lane * kU;
  const int g = ix.h / (d.H / d.G);
  const bool qk_lane = lane < kLanes;
  // This warp's rank: its biases (slots' a and b elements) and mimo_x row.
  const int64_t bias = (int64_t(ix.h) * R + r) * N, grp = int64_t(r * d.G + g) * N;
  float bqa[kU], bqb[kU], bka[kU], bkb[kU], mx[kC];
#pragma unroll
  for (int e = 0; e < kU; ++e) {
    bqa[e] = qk_lane ? p.C_bias[bias + u0 + e] : 0.0f, bqb[e] = qk_lane ? p.C_bias[bias + kHalf + u0 + e] : 0.0f;
    bka[e] = qk_lane ? p.B_bias[bias + u0 + e] : 0.0f, bkb[e] = qk_lane ? p.B_bias[bias + kHalf + u0 + e] : 0.0f;
  }
#pragma unroll
  for (int e = 0; e < kC; ++e) mx[e] = p.mimo_x[(int64_t(ix.h) * R + r) * P + lane * kC + e];

  for (int j0 = warp; j0 < p.rows; j0 += kAhead * kWarps) {
    float ca[kAhead][kU], cb[kAhead][kU], ka[kAhead][kU], kb[kAhead][kU], cs[kAhead][kU][2], x[kAhead][kC];
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      const int tl = (j0 + a * kWarps) / R;
      const bool real = tl < ix.Tc;
      const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + min(tl, ix.Tc - 1);
      const float* z = p.zx + tok * d.din;
#pragma unroll
      for (int e = 0; e < kU; ++e) ca[a][e] = cb[a][e] = ka[a][e] = kb[a][e] = 0.0f;
      if (real && qk_lane) {
        const float *zc = z + d.off_C + grp + u0, *zb = z + d.off_B + grp + u0;
        if constexpr (kU == 2) {
          const float2 c0 = *reinterpret_cast<const float2*>(zc), c1 = *reinterpret_cast<const float2*>(zc + kHalf);
          const float2 k0 = *reinterpret_cast<const float2*>(zb), k1 = *reinterpret_cast<const float2*>(zb + kHalf);
          ca[a][0] = c0.x, ca[a][1] = c0.y, cb[a][0] = c1.x, cb[a][1] = c1.y;
          ka[a][0] = k0.x, ka[a][1] = k0.y, kb[a][0] = k1.x, kb[a][1] = k1.y;
        } else {
          ca[a][0] = zc[0], cb[a][0] = zc[kHalf], ka[a][0] = zb[0], kb[a][0] = zb[kHalf];
        }
      }
#pragma unroll
      for (int e = 0; e < kU; ++e) {
        const int u = u0 + e;
        const float2 rot = real && qk_lane && u < d.S
                               ? rotary_cos_sin(angle_at(p.phi, p.phi_code, (ix.bh * d.L + ix.c0 + tl) * d.S + u))
                               : make_float2(1.0f, 0.0f);
        cs[a][e][0] = rot.x, cs[a][e][1] = rot.y;
      }
      const float* xr = z + d.off_x + int64_t(ix.h) * P + lane * kC;
      if constexpr (kC == 2) {
        const float2 xv = real ? *reinterpret_cast<const float2*>(xr) : make_float2(0.0f, 0.0f);
        x[a][0] = xv.x, x[a][1] = xv.y;
      } else {
        x[a][0] = real ? xr[0] : 0.0f;
      }
    }
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      const int j = j0 + a * kWarps;
      if (j >= p.rows) break;
      const int tl = j / R;
      const bool real = tl < ix.Tc;
      const int64_t row = ix.chunk * p.rows + j;
      if (qk_lane) {
        bf16 qa[kU], qb[kU], kao[kU], kbo[kU];
#pragma unroll
        for (int e = 0; e < kU; ++e) {
          __nv_bfloat162 q2 = __floats2bfloat162_rn(0.0f, 0.0f), k2 = q2;  // padding rows: zeros
          if (real) {
            const float c = cs[a][e][0], sv = cs[a][e][1];
            q2 = rotated_pair(ca[a][e], cb[a][e], bqa[e], bqb[e], c, sv, u0 + e < d.S);
            k2 = rotated_pair(ka[a][e], kb[a][e], bka[e], bkb[e], c, sv, u0 + e < d.S);
          }
          qa[e] = q2.x, qb[e] = q2.y, kao[e] = k2.x, kbo[e] = k2.y;
        }
        bf16* qd = static_cast<bf16*>(p.Q) + row * N + u0;
        bf16* kd = static_cast<bf16*>(p.K) + row * N + u0;
        if constexpr (kU == 2) {
          *reinterpret_cast<uint32_t*>(qd) = *reinterpret_cast<const uint32_t*>(qa);
          *reinterpret_cast<uint32_t*>(qd + kHalf) = *reinterpret_cast<const uint32_t*>(qb);
          *reinterpret_cast<uint32_t*>(kd) = *reinterpret_cast<const uint32_t*>(kao);
          *reinterpret_cast<uint32_t*>(kd + kHalf) = *reinterpret_cast<const uint32_t*>(kbo);
        } else {
          qd[0] = qa[0], qd[kHalf] = qb[0], kd[0] = kao[0], kd[kHalf] = kbo[0];
        }
      }
      const float w = wts[tl];
      float val[kC];
#pragma unroll
      for (int e = 0; e < kC; ++e) val[e] = real ? mx[e] * x[a][e] : 0.0f;
      bf16* vd = static_cast<bf16*>(p.V) + row * P + lane * kC;
      bf16* wd = static_cast<bf16*>(p.Vw) + row * P + lane * kC;
      if constexpr (kC == 2) {
        *reinterpret_cast<__nv_bfloat162*>(vd) = __floats2bfloat162_rn(val[0], val[1]);
        *reinterpret_cast<__nv_bfloat162*>(wd) = __floats2bfloat162_rn(w * val[0], w * val[1]);
      } else {
        vd[0] = __float2bfloat16_rn(val[0]), wd[0] = __float2bfloat16_rn(w * val[0]);
      }
    }
  }
}

// The output stage's per-head rows for a lane's kQ = P/32 channels q = lane + 32k: mimo_z and mimo_o of every rank,
// and the output norm's weights (1 without a norm: nw null).
template <int P, int R>
__device__ __forceinline__ void load_output_rows(const BatchedParams& p, int h, const float* nw,
                                                 float (&mz)[R][P / 32], float (&mo)[R][P / 32],
                                                 float (&nwq)[P / 32]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int k = 0; k < P / 32; ++k) {
      const int64_t i = (int64_t(h) * R + r) * P + lane + 32 * k;
      mz[r][k] = p.mimo_z[i], mo[r][k] = p.mimo_o[i];
    }
#pragma unroll
  for (int k = 0; k < P / 32; ++k) nwq[k] = nw ? nw[lane + 32 * k] : 1.0f;
}

// The MIMO output stage (forward: o; backward also dy, e^Λ ⊙ dy, dz, Λ's gradient from the state read and the
// D, mimo_z, mimo_o and norm partials) for P ∈ {32, 64}, R ∈ {2, 4}, bf16 operands: the generic kernel with a lane's
// kQ = P/32 channels q = lane + 32k of all R ranks in registers (y, Z and v of the token, the head's mimo_z/mimo_o
// rows, the warp's partial sums) instead of shared memory, and every load of a token before its stores. The sums run
// in the generic kernel's orders (a lane's channels in k order, then the warp butterfly; a warp's tokens in order;
// the warps in order), so the same bits. y's roundings are spelled out (chunk_row_y), as MIMO's forward core stores
// it where p.wv_holds_y.
template <int P, int R, bool kBwd>
__global__ void __launch_bounds__(kThreads) batched_output_mimo_kernel(const BatchedParams p) {
  pdl_wait();
  using bf16 = __nv_bfloat16;
  constexpr int kQ = P / 32, RP = R * P;
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* nw = d.outnorm ? p.norm + int64_t(ix.h) * P : nullptr;
  const float Dh = p.D[ix.h];
  const bf16* V = static_cast<const bf16*>(p.V);
  bf16 *dY = static_cast<bf16*>(p.dY), *dYe = static_cast<bf16*>(p.dYe);
  float mz[R][kQ], mo[R][kQ], nwq[kQ];
  load_output_rows<P, R>(p, ix.h, nw, mz, mo, nwq);
  // The warp's partial sums (go, gz per rank and channel, gn per channel, gD), as the generic kernel's shared rows.
  float go[R][kQ], gz[R][kQ], gn[kQ], gD = 0.0f;
#pragma unroll
  for (int k = 0; k < kQ; ++k) {
    gn[k] = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) go[r][k] = gz[r][k] = 0.0f;
  }
  for (int tl = warp; tl < p.T; tl += kWarps) {
    const int64_t row0 = (ix.chunk * p.rows + int64_t(tl) * R) * P;  // this token's first chunk row
    if (tl >= ix.Tc) {
      if (kBwd) {
        for (int e = lane; e < RP; e += 32) dY[row0 + e] = dYe[row0 + e] = __float2bfloat16_rn(0.0f);
        if (lane == 0) p.dLam[ix.chunk * p.T + tl] = 0.0f;
      }
      continue;
    }
    const float e = p.eL[ix.chunk * p.T + tl];
    const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + tl;
    float zv[R][kQ], vv[R][kQ], wv[R][kQ], zq[kQ], dOq[kQ];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int k = 0; k < kQ; ++k) {
        const int64_t i = row0 + r * P + lane + 32 * k;
        wv[r][k] = p.WV[i];  // (y itself where the forward core stored it)
        if (kBwd || !p.wv_holds_y) zv[r][k] = p.Z[i], vv[r][k] = __bfloat162float(V[i]);
      }
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      zq[k] = p.zx[tok * d.din + int64_t(ix.h) * P + lane + 32 * k];
      dOq[k] = kBwd ? p.dO[tok * d.d_inner + int64_t(ix.h) * P + lane + 32 * k] : 0.0f;
    }
    float y[R][kQ], rstd[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float ss = 0.0f;
#pragma unroll
      for (int k = 0; k < kQ; ++k) {
        y[r][k] = p.wv_holds_y ? wv[r][k] : chunk_row_y(e, zv[r][k], Dh, vv[r][k], wv[r][k]);
        ss += y[r][k] * y[r][k];
      }
      rstd[r] = nw ? 1.0f / sqrtf(warp_sum(ss) / float(P) + kEps) : 1.0f;
    }
    float dyn[R][kQ];
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      float o = 0.0f, dz = 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float yn = nw ? y[r][k] * rstd[r] * nwq[k] : y[r][k];
        const MimoGate mg = mimo_gate(yn, zq[k], mz[r][k], mo[r][k], dOq[k], true);
        o += mg.o;
        if (kBwd) go[r][k] += mg.go, dyn[r][k] = mg.dyn, gz[r][k] += mg.gz, dz += mg.dz;
      }
      const int64_t oi = tok * d.d_inner + int64_t(ix.h) * P + lane + 32 * k;
      if (p.o) p.o[oi] = o;
      if (p.o16) static_cast<bf16*>(p.o16)[oi] = __float2bfloat16_rn(o);
      if (kBwd) {
        const int64_t zi = tok * d.din + int64_t(ix.h) * P + lane + 32 * k;  // dzx's z column
        if (p.dzx16) reinterpret_cast<bf16*>(p.dzx16)[zi] = __float2bfloat16_rn(dz);
        else p.dzx[zi] = dz;
      }
    }
    if (!kBwd) continue;
    float dl = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mean = 0.0f;
      if (nw) {
#pragma unroll
        for (int k = 0; k < kQ; ++k) mean += dyn[r][k] * nwq[k] * (y[r][k] * rstd[r]);
        mean = warp_sum(mean) / float(P);
      }
      float dot = 0.0f;
#pragma unroll
      for (int k = 0; k < kQ; ++k) {
        const float dn = dyn[r][k];
        float v = dn;
        if (nw) {
          const float xh = y[r][k] * rstd[r];
          gn[k] += dn * xh;
          v = rstd[r] * (dn * nwq[k] - xh * mean);
        }
        const int64_t i = row0 + r * P + lane + 32 * k;
        dY[i] = __float2bfloat16_rn(v), dYe[i] = __float2bfloat16_rn(e * v);
        dot += v * zv[r][k];
        gD += v * vv[r][k];
      }
      dl += e * warp_sum(dot);
    }
    if (lane == 0) p.dLam[ix.chunk * p.T + tl] = dl;
  }
  if (!kBwd) return;
  // The warps' partials in the generic kernel's shared layout (go, gz: R·P each; gn: P; then gD), summed in warp order.
  extern __shared__ float sm[];
  constexpr int per_warp = 2 * RP + P;
  float* mine = sm + warp * per_warp;
#pragma unroll
  for (int k = 0; k < kQ; ++k) {
    const int q = lane + 32 * k;
#pragma unroll
    for (int r = 0; r < R; ++r) mine[r * P + q] = go[r][k], mine[RP + r * P + q] = gz[r][k];
    mine[2 * RP + q] = gn[k];
  }
  gD = warp_sum(gD);
  float* wD = sm + kWarps * per_warp;
  if (lane == 0) wD[warp] = gD;
  __syncthreads();
  const int64_t prow = ix.prow(p);
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += wD[w];
    p.part_D[prow] = s;
  }
  for (int i = threadIdx.x; i < RP; i += kThreads) {
    float sz = 0.0f, so = 0.0f;
    for (int w = 0; w < kWarps; ++w) sz += sm[w * per_warp + RP + i], so += sm[w * per_warp + i];
    p.part_mimo_z[prow * RP + i] = sz, p.part_mimo_o[prow * RP + i] = so;
  }
  if (nw)
    for (int q = threadIdx.x; q < P; q += kThreads) {
      float s = 0.0f;
      for (int w = 0; w < kWarps; ++w) s += sm[w * per_warp + 2 * RP + q];
      p.part_norm[prow * P + q] = s;
    }
}

// The MIMO output stage's forward where the forward core stored y (p.wv_holds_y) and the chunk is 64 rows: the output
// instance's forward arithmetic (the same bits), but each warp's kTok = 8 / R tokens have all their loads (y of every
// rank, z) issued before the first token's arithmetic and stores: the instance's loop waited a DRAM round trip per
// token behind the previous token's stores.
template <int P, int R>
__global__ void __launch_bounds__(kThreads) batched_output_mimo_y_kernel(const BatchedParams p) {
  pdl_wait();
  using bf16 = __nv_bfloat16;
  constexpr int kQ = P / 32, kTok = 64 / R / kWarps;
  static_assert(kTok * R * kWarps == 64, "the 64-row chunks' tokens over the warps");
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* nw = d.outnorm ? p.norm + int64_t(ix.h) * P : nullptr;
  float mz[R][kQ], mo[R][kQ], nwq[kQ];
  load_output_rows<P, R>(p, ix.h, nw, mz, mo, nwq);
  float y[kTok][R][kQ], zq[kTok][kQ];
#pragma unroll
  for (int i = 0; i < kTok; ++i) {
    const int tl = warp + i * kWarps;
    const bool real = tl < ix.Tc;
    const int64_t row0 = (ix.chunk * p.rows + int64_t(tl) * R) * P, tok = int64_t(ix.b) * d.L + ix.c0 + tl;
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
#pragma unroll
      for (int r = 0; r < R; ++r) y[i][r][k] = p.WV[row0 + r * P + lane + 32 * k];
      zq[i][k] = real ? p.zx[tok * d.din + int64_t(ix.h) * P + lane + 32 * k] : 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < kTok; ++i) {
    const int tl = warp + i * kWarps;
    if (tl >= ix.Tc) break;
    const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + tl;
    float rstd[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float ss = 0.0f;
#pragma unroll
      for (int k = 0; k < kQ; ++k) ss += y[i][r][k] * y[i][r][k];
      rstd[r] = nw ? 1.0f / sqrtf(warp_sum(ss) / float(P) + kEps) : 1.0f;
    }
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      float o = 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float yn = nw ? y[i][r][k] * rstd[r] * nwq[k] : y[i][r][k];
        o += mimo_gate(yn, zq[i][k], mz[r][k], mo[r][k], 0.0f, true).o;
      }
      const int64_t oi = tok * d.d_inner + int64_t(ix.h) * P + lane + 32 * k;
      if (p.o) p.o[oi] = o;
      if (p.o16) static_cast<bf16*>(p.o16)[oi] = __float2bfloat16_rn(o);
    }
  }
}

// The MIMO rotation backward (bf16 q and k; the halves pairing): a block per (sequence, slot of HB heads, chunk), a
// warp per token as in the generic kernel, lane l on the kU = max(N/64, 1) consecutive slots u = l·kU … (elements
// u and u + N/2: paired loads and stores). Per token and rank the HB heads' dq, dk, q and k are loaded before any is
// used, each (head, slot) angle's cos/sin is formed once per token (the generic kernel formed it per rank) and its dφ
// is summed over the ranks in registers (the generic kernel re-read its global partial per rank). The sums run in
// the generic kernel's orders (dφ: rank by rank, q then k; dBn/dCn: over the block's heads in order; the bias
// partials: the warp's tokens in order in the same shared rows), so the same bits.
// kFormQK: q and k formed again from zx's normalised B/C rows (per token and rank, for every head of the block), the
// biases and φ exactly as the MIMO build formed them (rotated_pair: the same bits) instead of read back: q and k are
// H·R rows per token where B/C are R (125M MIMO R = 4: 805 MB fewer per layer).
template <int N, int R, int HB, bool kFormQK>
__global__ void __launch_bounds__(kThreads) batched_rotation_backward_mimo_kernel(const BatchedParams p) {
  pdl_wait();
  using bf16 = __nv_bfloat16;
  constexpr int kHalf = N / 2, kU = kHalf >= 64 ? kHalf / 32 : 1, kLanes = kHalf / kU, RN = R * N;
  const MixerDims& d = p.d;
  const int S = d.S, slots = d.H / HB, warp = threadIdx.x / 32, lane = threadIdx.x % 32, u0 = lane * kU;
  const int c = int(blockIdx.x % p.nc), slot = int(blockIdx.x / p.nc % slots), b = int(blockIdx.x / p.nc / slots);
  const int c0 = c * p.T, Tc = min(p.T, d.L - c0), h0 = slot * HB;
  const bf16 *__restrict__ Q = static_cast<const bf16*>(p.Q), *__restrict__ K = static_cast<const bf16*>(p.K);
  const float *__restrict__ dQ = p.dQ, *__restrict__ dK = p.dK;
  // dQ and dK as the state core wrote them: bf16 (p.dQ16, p.dK16) or f32.
  const auto grad2 = [](const float* f, const uint16_t* h, int64_t j) {
    return h ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(h + j)) : *reinterpret_cast<const float2*>(f + j);
  };
  const auto grad1 = [](const float* f, const uint16_t* h, int64_t j) {
    return h ? __bfloat162float(*reinterpret_cast<const bf16*>(h + j)) : f[j];
  };
  extern __shared__ float sm[];  // (kWarps, HB, 2, R·N): gC then gB per warp and head
  for (int e = threadIdx.x; e < kWarps * HB * 2 * RN; e += kThreads) sm[e] = 0.0f;
  __syncthreads();
  float* mine = sm + warp * HB * 2 * RN;
  const bool active = lane < kLanes;
  const int g = h0 / (d.H / d.G);  // the block's heads share one B/C group
  for (int tl = warp; tl < Tc; tl += kWarps) {
    if (!active) continue;
    const int64_t t = c0 + tl, tok = int64_t(b) * d.L + t;
    float cs[HB][kU][2], dph[HB][kU];
#pragma unroll
    for (int hh = 0; hh < HB; ++hh) {
      const int64_t st = (int64_t(b) * d.H + h0 + hh) * d.L + t;
#pragma unroll
      for (int e = 0; e < kU; ++e) {
        const float2 rot =
            u0 + e < S ? rotary_cos_sin(angle_at(p.phi, p.phi_code, st * S + u0 + e)) : make_float2(1.0f, 0.0f);
        cs[hh][e][0] = rot.x, cs[hh][e][1] = rot.y, dph[hh][e] = 0.0f;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float qa[HB][kU], qb[HB][kU], ka[HB][kU], kb[HB][kU], gqa[HB][kU], gqb[HB][kU], gka[HB][kU], gkb[HB][kU];
      float zca[kU], zcb[kU], zba[kU], zbb[kU];  // kFormQK: the token's normalised C and B of rank r (the group's)
      if constexpr (kFormQK) {
        const float* z = p.zx + tok * d.din + int64_t(r * d.G + g) * N + u0;
#pragma unroll
        for (int e = 0; e < kU; ++e) {
          zca[e] = z[d.off_C + e], zcb[e] = z[d.off_C + kHalf + e];
          zba[e] = z[d.off_B + e], zbb[e] = z[d.off_B + kHalf + e];
        }
      }
#pragma unroll
      for (int hh = 0; hh < HB; ++hh) {
        const int64_t chunk = (int64_t(b) * d.H + h0 + hh) * p.nc + c;
        const int64_t j = (chunk * p.rows + int64_t(tl) * R + r) * N + u0;
        if constexpr (kU == 2) {
          const float2 a0 = grad2(dQ, p.dQ16, j), a1 = grad2(dQ, p.dQ16, j + kHalf);
          const float2 b0 = grad2(dK, p.dK16, j), b1 = grad2(dK, p.dK16, j + kHalf);
          gqa[hh][0] = a0.x, gqa[hh][1] = a0.y, gqb[hh][0] = a1.x, gqb[hh][1] = a1.y;
          gka[hh][0] = b0.x, gka[hh][1] = b0.y, gkb[hh][0] = b1.x, gkb[hh][1] = b1.y;
        } else {
          gqa[hh][0] = grad1(dQ, p.dQ16, j), gqb[hh][0] = grad1(dQ, p.dQ16, j + kHalf);
          gka[hh][0] = grad1(dK, p.dK16, j), gkb[hh][0] = grad1(dK, p.dK16, j + kHalf);
        }
        if constexpr (kFormQK) {  // (qa … kb hold the biases until the rotation below)
          const int64_t bias = (int64_t(h0 + hh) * R + r) * N + u0;
#pragma unroll
          for (int e = 0; e < kU; ++e) {
            qa[hh][e] = p.C_bias[bias + e], qb[hh][e] = p.C_bias[bias + kHalf + e];
            ka[hh][e] = p.B_bias[bias + e], kb[hh][e] = p.B_bias[bias + kHalf + e];
          }
        } else if constexpr (kU == 2) {
          const float2 q0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Q + j));
          const float2 q1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Q + j + kHalf));
          const float2 k0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(K + j));
          const float2 k1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(K + j + kHalf));
          qa[hh][0] = q0.x, qa[hh][1] = q0.y, qb[hh][0] = q1.x, qb[hh][1] = q1.y;
          ka[hh][0] = k0.x, ka[hh][1] = k0.y, kb[hh][0] = k1.x, kb[hh][1] = k1.y;
        } else {
          qa[hh][0] = __bfloat162float(Q[j]), qb[hh][0] = __bfloat162float(Q[j + kHalf]);
          ka[hh][0] = __bfloat162float(K[j]), kb[hh][0] = __bfloat162float(K[j + kHalf]);
        }
      }
      float sCa[kU], sCb[kU], sBa[kU], sBb[kU];
#pragma unroll
      for (int e = 0; e < kU; ++e) sCa[e] = sCb[e] = sBa[e] = sBb[e] = 0.0f;
#pragma unroll
      for (int hh = 0; hh < HB; ++hh) {
        float* gC = mine + (hh * 2) * RN + r * N;
        float* gB = gC + RN;
#pragma unroll
        for (int e = 0; e < kU; ++e) {
          const float gq_x = gqa[hh][e], gq_y = gqb[hh][e], gk_x = gka[hh][e], gk_y = gkb[hh][e];
          float ca = gq_x, cb = gq_y, ba = gk_x, bb = gk_y;
          if (u0 + e < S) {
            const float csv = cs[hh][e][0], sn = cs[hh][e][1];
            if constexpr (kFormQK) {
              const float2 q2 = __bfloat1622float2(rotated_pair(zca[e], zcb[e], qa[hh][e], qb[hh][e], csv, sn, true));
              const float2 k2 = __bfloat1622float2(rotated_pair(zba[e], zbb[e], ka[hh][e], kb[hh][e], csv, sn, true));
              qa[hh][e] = q2.x, qb[hh][e] = q2.y, ka[hh][e] = k2.x, kb[hh][e] = k2.y;
            }
            float acc = dph[hh][e];
            acc += gq_y * qa[hh][e] - gq_x * qb[hh][e];
            acc += gk_y * ka[hh][e] - gk_x * kb[hh][e];
            dph[hh][e] = acc;
            ca = gq_x * csv + gq_y * sn, cb = gq_y * csv - gq_x * sn;
            ba = gk_x * csv + gk_y * sn, bb = gk_y * csv - gk_x * sn;
          }
          gC[u0 + e] += ca, gB[u0 + e] += ba;
          gC[u0 + e + kHalf] += cb, gB[u0 + e + kHalf] += bb;
          sCa[e] += ca, sCb[e] += cb, sBa[e] += ba, sBb[e] += bb;
        }
      }
      float* oC = p.dCn + ((tok * slots + slot) * R + r) * N + u0;
      float* oB = p.dBn + ((tok * slots + slot) * R + r) * N + u0;
      if constexpr (kU == 2) {
        *reinterpret_cast<float2*>(oC) = make_float2(sCa[0], sCa[1]);
        *reinterpret_cast<float2*>(oC + kHalf) = make_float2(sCb[0], sCb[1]);
        *reinterpret_cast<float2*>(oB) = make_float2(sBa[0], sBa[1]);
        *reinterpret_cast<float2*>(oB + kHalf) = make_float2(sBb[0], sBb[1]);
      } else {
        oC[0] = sCa[0], oC[kHalf] = sCb[0], oB[0] = sBa[0], oB[kHalf] = sBb[0];
      }
    }
#pragma unroll
    for (int hh = 0; hh < HB; ++hh) {
      const int64_t st = (int64_t(b) * d.H + h0 + hh) * d.L + t;
#pragma unroll
      for (int e = 0; e < kU; ++e)
        if (u0 + e < S) p.dphi[st * S + u0 + e] = dph[hh][e];
    }
  }
  __syncthreads();
  write_bias_partials(p, sm, b, c, h0, HB, RN);
}

// The MIMO epilogue's state part (after the reverse scan or chain, the products tp = k·dHᵀ in p.Z and dK's second
// term done): a warp per token, lane l on the channels q = l + 32k of all R ranks, every load of the token (tp, v,
// dV, dy of each rank row, x) before its dx store, the head's mimo_x rows and the warp's mimo_x partials in
// registers; then the shared tail (epilogue_state_tail). The generic kernel's expressions and sum orders: dx over the
// ranks in order, Σ v·tp per rank over the lane's channels in order then the butterfly, the partials over the warp's
// tokens in order then the warps in order.
// (MIMO's state core runs this part itself where p.epilogue_in_core: this kernel is then not launched.)
template <int P, int R>
__global__ void __launch_bounds__(kThreads, 2) batched_epilogue_mimo_kernel(const BatchedParams p) {
  pdl_wait();
  using bf16 = __nv_bfloat16;
  constexpr int kQ = P / 32, RP = R * P;
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int T = p.T, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float Dh = p.D[ix.h];
  const bf16 *V = static_cast<const bf16*>(p.V), *dY = static_cast<const bf16*>(p.dY);
  extern __shared__ float sm[];
  float *Lam = sm, *scale = sm + T, *dL = sm + 2 * T, *rdot = sm + 3 * T, *wsum = rdot + p.rows;
  float* gXall = wsum + kWarps;  // per warp: gX (R·P), the generic kernel's layout
  for (int tl = threadIdx.x; tl < T; tl += kThreads) {
    const int64_t i = ix.chunk * T + tl;
    Lam[tl] = p.Lam[i], scale[tl] = p.scale[i], dL[tl] = p.dLam[i];
  }
  float mx[R][kQ], gX[R][kQ];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int k = 0; k < kQ; ++k)
      mx[r][k] = p.mimo_x[(int64_t(ix.h) * R + r) * P + lane + 32 * k], gX[r][k] = 0.0f;
  const int64_t base_p = ix.chunk * p.rows * P;
  for (int tl = warp; tl < T; tl += kWarps) {
    const float w = p.wv[ix.chunk * T + tl];
    const bool real = tl < ix.Tc;
    const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + tl;
    const float* x = p.zx + tok * d.din + d.off_x + int64_t(ix.h) * P;
    float tp[R][kQ], vv[R][kQ], dv0[R][kQ], dy[R][kQ], xq[kQ];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int k = 0; k < kQ; ++k) {
        const int64_t i = base_p + (int64_t(tl) * R + r) * P + lane + 32 * k;
        tp[r][k] = p.Z[i], vv[r][k] = __bfloat162float(V[i]), dv0[r][k] = p.dV[i], dy[r][k] = __bfloat162float(dY[i]);
      }
#pragma unroll
    for (int k = 0; k < kQ; ++k) xq[k] = real ? x[lane + 32 * k] : 0.0f;  // (padding tokens have no row)
    float dots[R];
#pragma unroll
    for (int r = 0; r < R; ++r) dots[r] = 0.0f;
#pragma unroll
    for (int k = 0; k < kQ; ++k) {
      float dx = 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        dots[r] += vv[r][k] * tp[r][k];
        const float dv = (dv0[r][k] + Dh * dy[r][k]) + w * tp[r][k];
        dx += dv * mx[r][k];
        if (real) gX[r][k] += dv * xq[k];
      }
      if (real) {
        const int64_t xi = tok * d.din + d.off_x + int64_t(ix.h) * P + lane + 32 * k;  // dzx's x column
        if (p.dzx16) reinterpret_cast<bf16*>(p.dzx16)[xi] = __float2bfloat16_rn(dx);
        else p.dzx[xi] = dx;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float dot = warp_sum(dots[r]);
      if (lane == 0) rdot[tl * R + r] = dot;
    }
  }
  float* mine = gXall + warp * RP;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int k = 0; k < kQ; ++k) mine[r * P + lane + 32 * k] = gX[r][k];
  __syncthreads();  // (Lam, scale, dL too)
  epilogue_state_tail(p, ix, Lam, scale, dL, rdot, wsum, gXall);
}

template <int R>
void launch_build_mimo_rank(cudaStream_t s, const BatchedParams& p) {
  const auto run = [&](auto kernel) { launch_per_chunk(kernel, s, p, size_t(3 * p.T)); };
  const MixerDims& d = p.d;
  if (d.N == 128) d.P == 64 ? run(batched_build_mimo_kernel<128, 64, R>) : run(batched_build_mimo_kernel<128, 32, R>);
  else if (d.N == 64) d.P == 64 ? run(batched_build_mimo_kernel<64, 64, R>) : run(batched_build_mimo_kernel<64, 32, R>);
  else d.P == 64 ? run(batched_build_mimo_kernel<32, 64, R>) : run(batched_build_mimo_kernel<32, 32, R>);
}

}  // namespace

template <bool kBwd>
void launch_output_mimo_shape(cudaStream_t s, const BatchedParams& p) {
  const size_t floats = size_t(kWarps) * (2 * p.d.R * p.d.P + p.d.P) + kWarps;
  const auto run = [&](auto kernel) { launch_per_chunk(kernel, s, p, floats); };
  if (p.d.R == 4) p.d.P == 64 ? run(batched_output_mimo_kernel<64, 4, kBwd>) : run(batched_output_mimo_kernel<32, 4, kBwd>);
  else p.d.P == 64 ? run(batched_output_mimo_kernel<64, 2, kBwd>) : run(batched_output_mimo_kernel<32, 2, kBwd>);
}

bool output_mimo_instance_applies(const BatchedParams& p) {
  const MixerDims& d = p.d;
  // (f32 z and dO only: build_mimo_applies)
  return p.siso_kernels && p.bf16 && d.mimo && (d.R == 2 || d.R == 4) && (d.P == 32 || d.P == 64) && !p.zx16 &&
         !p.dO16;
}

bool launch_output_mimo(cudaStream_t s, const BatchedParams& p, bool backward) {
  if (!output_mimo_instance_applies(p)) return false;
  // (MIMO's forward with y stored: every token of a warp in flight, unless one token at a time is asked for)
  if (!backward && p.wv_holds_y && p.output_tokens != 1 && p.rows == 64 && p.T * p.d.R == 64) {
    const auto run = [&](auto kernel) { launch_per_chunk(kernel, s, p, 0); };
    if (p.d.R == 4) p.d.P == 64 ? run(batched_output_mimo_y_kernel<64, 4>) : run(batched_output_mimo_y_kernel<32, 4>);
    else p.d.P == 64 ? run(batched_output_mimo_y_kernel<64, 2>) : run(batched_output_mimo_y_kernel<32, 2>);
    return true;
  }
  if (backward) launch_output_mimo_shape<true>(s, p);
  else launch_output_mimo_shape<false>(s, p);
  return true;
}

template <int N, int R>
void launch_rotation_mimo_heads(cudaStream_t s, const BatchedParams& p) {
  const int hb = p.heads_per_block;
  const auto run = [&](auto kernel) {
    const int64_t blocks = int64_t(p.d.B) * (p.d.H / hb) * p.nc;
    const size_t bytes = size_t(kWarps) * hb * 2 * R * N * sizeof(float);  // the generic kernel's
    if (bytes > 48 * 1024)
      MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    launch_train(kernel, unsigned(blocks), kThreads, bytes, s, p);
    MAMBA3_LAUNCH_CHECK();
  };
  // q and k formed again where the MIMO build wrote them (its bits).
  const auto pick = [&](auto form_qk) {
    constexpr bool kF = decltype(form_qk)::value;
    if (hb == 4) run(batched_rotation_backward_mimo_kernel<N, R, 4, kF>);
    else if (hb == 3) run(batched_rotation_backward_mimo_kernel<N, R, 3, kF>);
    else if (hb == 2) run(batched_rotation_backward_mimo_kernel<N, R, 2, kF>);
    else run(batched_rotation_backward_mimo_kernel<N, R, 1, kF>);
  };
  if (build_mimo_applies(p)) pick(std::true_type{});
  else pick(std::false_type{});
}

template <int R>
void launch_rotation_mimo_rank(cudaStream_t s, const BatchedParams& p) {
  if (p.d.N == 128) launch_rotation_mimo_heads<128, R>(s, p);
  else if (p.d.N == 64) launch_rotation_mimo_heads<64, R>(s, p);
  else launch_rotation_mimo_heads<32, R>(s, p);
}

bool rotation_backward_mimo_applies(const BatchedParams& p) {
  const MixerDims& d = p.d;
  const int hb = p.heads_per_block;  // (checked by the caller: divides a group's heads)
  return p.siso_kernels && p.bf16 && d.mimo && (d.R == 2 || d.R == 4) && (d.N == 32 || d.N == 64 || d.N == 128) &&
         hb >= 1 && hb <= 4;
}

bool launch_rotation_backward_mimo(cudaStream_t s, const BatchedParams& p) {
  const MixerDims& d = p.d;
  if (!rotation_backward_mimo_applies(p)) return false;
  MAMBA3_CHECK(!p.dqk_unrotated, "MIMO rotation backward: dQ/dK un-rotated by a core are SISO's only");
  if (d.R == 4) launch_rotation_mimo_rank<4>(s, p);
  else launch_rotation_mimo_rank<2>(s, p);
  return true;
}

bool epilogue_mimo_instance_applies(const BatchedParams& p) {
  const MixerDims& d = p.d;
  return p.siso_kernels && p.bf16 && d.mimo && (d.R == 2 || d.R == 4) && (d.P == 32 || d.P == 64) && p.Hc16 &&
         p.dHc16 && !p.zx16;
}

bool launch_epilogue_mimo(cudaStream_t s, const BatchedParams& p, size_t floats) {
  if (!epilogue_mimo_instance_applies(p)) return false;
  const MixerDims& d = p.d;
  const auto run = [&](auto kernel) { launch_per_chunk(kernel, s, p, floats); };
  if (d.R == 4) d.P == 64 ? run(batched_epilogue_mimo_kernel<64, 4>) : run(batched_epilogue_mimo_kernel<32, 4>);
  else d.P == 64 ? run(batched_epilogue_mimo_kernel<64, 2>) : run(batched_epilogue_mimo_kernel<32, 2>);
  return true;
}

bool build_mimo_applies(const BatchedParams& p) {
  // The cores' shapes, R ∈ {2, 4}, and 8-byte-aligned zx rows and B/C offsets (its paired loads). The MIMO instances
  // read z, x and dO in f32 (MIMO keeps them so: Mamba3TrainGpu::set_zx_bf16); bf16 copies take the generic kernels.
  const MixerDims& d = p.d;
  return !p.zx16 && p.siso_kernels && p.bf16 && d.mimo && (d.R == 2 || d.R == 4) && p.rows == p.T * d.R &&
         p.rows <= 64 && (d.N == 32 || d.N == 64 || d.N == 128) && (d.P == 32 || d.P == 64) && d.din % 2 == 0 && d.off_B % 2 == 0 &&
         d.off_C % 2 == 0 && d.off_x % 2 == 0 && d.G >= 1 && d.H % d.G == 0;
}

bool launch_build_mimo(cudaStream_t s, const BatchedParams& p) {
  const MixerDims& d = p.d;
  if (!build_mimo_applies(p)) return false;
  if (d.R == 4) launch_build_mimo_rank<4>(s, p);
  else launch_build_mimo_rank<2>(s, p);
  return true;
}

}  // namespace mamba3::cuda::train_detail::batched
