// The batched-GEMM path of the Mamba-3 mixer's GPU training pass: the per-chunk elementwise kernels that sit between
// the strided-batched cuBLAS products (orchestrated in mamba3_train_gpu.cpp; the math is the CPU's chunked backward,
// src/ops/mamba3_scan_backward.cpp). Every kernel runs one 256-thread block per (sequence, head, chunk) and reads and
// writes the chunk-row buffers of BatchedParams. Deterministic: every sum has one owning thread or warp and a fixed
// order; no atomics.
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/mamba3_train_batched_common.cuh"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_math.cuh"

namespace mamba3::cuda::train_detail {

namespace {

using batched::ChunkIndex, batched::kThreads, batched::kWarps, batched::build_chunk_scalars, batched::launch_per_chunk,
    batched::write_bias_partials, batched::zx_col, batched::dO_at;

// Rotary slot u < ⌈N/2⌉ of a B/C vector: its elements a and b (SISO pairs (2u, 2u+1), MIMO halves (u, u + N/2)),
// whether they rotate together by angle u (u < S) and whether b exists (an odd SISO N leaves the last one alone).
struct PairSlot {
  int a, b;
  bool rot, has_b;
};
__device__ __forceinline__ PairSlot pair_slot(int u, int N, int S, bool halves) {
  if (halves) return {u, u + N / 2, u < S, true};
  return {2 * u, 2 * u + 1, u < S, 2 * u + 1 < N};
}

// Operand storage: f32 (the exact mode) or bf16 (BatchedParams::bf16), read and written as f32 values.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename In> __device__ __forceinline__ In from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The two elements of a pair slot: one access of both when they are adjacent (SISO) and the row is aligned to two
// elements (`vec`, uniform over a warp's row), else two scalar ones.
__device__ __forceinline__ float2 load_pair(const float* v, const PairSlot& ps, bool vec) {
  if (vec) return *reinterpret_cast<const float2*>(v + ps.a);
  return make_float2(v[ps.a], ps.has_b ? v[ps.b] : 0.0f);
}
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* v, const PairSlot& ps, bool vec) {
  if (vec) return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(v + ps.a));
  return make_float2(__bfloat162float(v[ps.a]), ps.has_b ? __bfloat162float(v[ps.b]) : 0.0f);
}
__device__ __forceinline__ void store_pair(float* v, const PairSlot& ps, bool vec, float a, float b) {
  if (vec) {
    *reinterpret_cast<float2*>(v + ps.a) = make_float2(a, b);
    return;
  }
  v[ps.a] = a;
  if (ps.has_b) v[ps.b] = b;
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* v, const PairSlot& ps, bool vec, float a, float b) {
  if (vec) {
    *reinterpret_cast<__nv_bfloat162*>(v + ps.a) = __floats2bfloat162_rn(a, b);
    return;
  }
  v[ps.a] = __float2bfloat16_rn(a);
  if (ps.has_b) v[ps.b] = __float2bfloat16_rn(b);
}
template <typename T>
__device__ __forceinline__ bool aligned2(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & (2 * sizeof(T) - 1)) == 0;
}

// One chunk row's inputs for the build's two-rows-at-a-time path (N ≤ 128, P ≤ 64): per lane the rotary slots lane
// and lane + 32 (C and B with their biases, the angle's cos/sin) and the channels lane and lane + 32 (mimo_x ⊙ x).
struct BuildRow {
  float2 cv[2], kv[2], rot[2];
  float val[2];
  bool real, vec;
};

__device__ __forceinline__ BuildRow load_build_row(const BatchedParams& p, const ChunkIndex& ix, int j, int g, int lane,
                                                   int slots) {
  const MixerDims& d = p.d;
  BuildRow row{};
  const int tl = j / d.R, r = j % d.R;
  row.real = j < p.rows && tl < ix.Tc;
  if (!row.real) return row;
  const int64_t t = ix.c0 + tl, st = ix.bh * d.L + t, row_n = (ix.chunk * p.rows + j) * d.N;
  const float* z = p.zx + (int64_t(ix.b) * d.L + t) * d.din;
  const int64_t ph0 = st * d.S;  // (the token's angles: angle_at)
  const int64_t bias = (int64_t(ix.h) * d.R + r) * d.N, grp = int64_t(r * d.G + g) * d.N;
  const float *zc = z + d.off_C + grp, *zb = z + d.off_B + grp, *bc = p.C_bias + bias, *bb = p.B_bias + bias;
  row.vec = !d.mimo && d.N % 2 == 0 && aligned2(zc) && aligned2(zb) && aligned2(bc) && aligned2(bb) &&
            (row_n % 2) == 0;
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int u = lane + 32 * m;
    row.cv[m] = row.kv[m] = row.rot[m] = make_float2(0.0f, 0.0f);
    if (u >= slots) continue;
    const PairSlot ps = pair_slot(u, d.N, d.S, d.mimo);
    const float2 zcv = load_pair(zc, ps, row.vec), bcv = load_pair(bc, ps, row.vec);
    const float2 zbv = load_pair(zb, ps, row.vec), bbv = load_pair(bb, ps, row.vec);
    row.cv[m] = make_float2(zcv.x + bcv.x, zcv.y + bcv.y), row.kv[m] = make_float2(zbv.x + bbv.x, zbv.y + bbv.y);
    if (ps.rot) row.rot[m] = rotary_cos_sin(angle_at(p.phi, p.phi_code, ph0 + u));
  }
  const int64_t tok = int64_t(ix.b) * d.L + t, xcol = d.off_x + int64_t(ix.h) * d.P;
  const float* mx = d.mimo ? p.mimo_x + (int64_t(ix.h) * d.R + r) * d.P : nullptr;
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int e = lane + 32 * m;
    const float x = e < d.P ? zx_col(p, tok, xcol + e) : 0.0f;
    row.val[m] = e < d.P ? (mx ? mx[e] * x : x) : 0.0f;
  }
  return row;
}

// The row's q, k (rotated, biased), v and w ⊙ v from its loads (zeros for padding rows); w = e^{Λ_last − Λ}·scale.
template <typename In>
__device__ __forceinline__ void store_build_row(const BatchedParams& p, const ChunkIndex& ix, int j, const BuildRow& row,
                                                const float* wv, int lane, int slots) {
  const MixerDims& d = p.d;
  if (j >= p.rows) return;
  const int64_t row_n = (ix.chunk * p.rows + j) * d.N, row_p = (ix.chunk * p.rows + j) * d.P;
  In *q = static_cast<In*>(p.Q) + row_n, *k = static_cast<In*>(p.K) + row_n;
  In *v = static_cast<In*>(p.V) + row_p, *vw = static_cast<In*>(p.Vw) + row_p;
  if (!row.real) {
    for (int n = lane; n < d.N; n += 32) q[n] = from_f<In>(0.0f), k[n] = from_f<In>(0.0f);
    for (int e = lane; e < d.P; e += 32) v[e] = from_f<In>(0.0f), vw[e] = from_f<In>(0.0f);
    return;
  }
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int u = lane + 32 * m;
    if (u >= slots) continue;
    const PairSlot ps = pair_slot(u, d.N, d.S, d.mimo);
    const float ca = row.cv[m].x, cb = row.cv[m].y, ka = row.kv[m].x, kb = row.kv[m].y;
    if (ps.rot) {
      const float c = row.rot[m].x, sv = row.rot[m].y;
      store_pair(q, ps, row.vec, ca * c - cb * sv, ca * sv + cb * c);
      store_pair(k, ps, row.vec, ka * c - kb * sv, ka * sv + kb * c);
    } else {
      store_pair(q, ps, row.vec, ca, cb);
      store_pair(k, ps, row.vec, ka, kb);
    }
  }
  const float w = wv[j / d.R];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int e = lane + 32 * m;
    if (e < d.P) v[e] = from_f<In>(row.val[m]), vw[e] = from_f<In>(w * row.val[m]);
  }
}

// Chunk scalars, q, k (rotated, biased), v and w ⊙ v; padding rows zero.
// Four blocks per SM (64 registers), as before the two-rows path.
template <typename In>
__global__ void __launch_bounds__(kThreads, 4) batched_build_kernel(const BatchedParams p) {
  pdl_wait();
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int rows = p.rows;
  extern __shared__ float sm[];
  const float* dtv = build_chunk_scalars(p, ix, sm);  // w per token
  // A warp per chunk row j = tl·R + r; a lane per rotary slot (both elements of a pair: one read of each input).
  const int g = ix.h / (d.H / d.G), warp = threadIdx.x / 32, lane = threadIdx.x % 32, slots = (d.N + 1) / 2;
  if (slots <= 64 && d.P <= 64) {
    // Two rows per warp at a time, all their loads (B, C, biases, angles, x) before any store: a load after a store
    // through a pointer the compiler cannot tell apart waits for it, so the row-at-a-time loop below paid two memory
    // latencies per row.
    for (int j0 = warp; j0 < rows; j0 += 2 * kWarps) {
      BuildRow row[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) row[i] = load_build_row(p, ix, j0 + i * kWarps, g, lane, slots);
#pragma unroll
      for (int i = 0; i < 2; ++i) store_build_row<In>(p, ix, j0 + i * kWarps, row[i], dtv, lane, slots);
    }
    return;
  }
  for (int j = warp; j < rows; j += kWarps) {
    const int tl = j / d.R, r = j % d.R;
    const int64_t row_n = (ix.chunk * rows + j) * d.N, row_p = (ix.chunk * rows + j) * d.P;
    In *q = static_cast<In*>(p.Q) + row_n, *k = static_cast<In*>(p.K) + row_n;
    In *v = static_cast<In*>(p.V) + row_p, *vw = static_cast<In*>(p.Vw) + row_p;
    if (tl >= ix.Tc) {
      for (int n = lane; n < d.N; n += 32) q[n] = from_f<In>(0.0f), k[n] = from_f<In>(0.0f);
      for (int e = lane; e < d.P; e += 32) v[e] = from_f<In>(0.0f), vw[e] = from_f<In>(0.0f);
      continue;
    }
    const int64_t t = ix.c0 + tl, st = ix.bh * d.L + t;
    const float* z = p.zx + (int64_t(ix.b) * d.L + t) * d.din;
    const int64_t ph0 = st * d.S;
    const int64_t bias = (int64_t(ix.h) * d.R + r) * d.N, grp = int64_t(r * d.G + g) * d.N;
    const float *zc = z + d.off_C + grp, *zb = z + d.off_B + grp, *bc = p.C_bias + bias, *bb = p.B_bias + bias;
    const bool vec = !d.mimo && d.N % 2 == 0 && aligned2(zc) && aligned2(zb) && aligned2(bc) && aligned2(bb) &&
                     aligned2(q) && aligned2(k);
    // Two slots (then two channels) per lane at a time, every load before the stores: a load after a store through
    // a pointer the compiler cannot tell apart waits for it.
    for (int u0 = lane; u0 < slots; u0 += 64) {
      float2 cv[2], kv[2], rot[2];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int u = u0 + 32 * m;
        cv[m] = kv[m] = rot[m] = make_float2(0.0f, 0.0f);
        if (u >= slots) continue;
        const PairSlot ps = pair_slot(u, d.N, d.S, d.mimo);
        const float2 zcv = load_pair(zc, ps, vec), bcv = load_pair(bc, ps, vec);
        const float2 zbv = load_pair(zb, ps, vec), bbv = load_pair(bb, ps, vec);
        cv[m] = make_float2(zcv.x + bcv.x, zcv.y + bcv.y), kv[m] = make_float2(zbv.x + bbv.x, zbv.y + bbv.y);
        if (ps.rot) rot[m] = rotary_cos_sin(angle_at(p.phi, p.phi_code, ph0 + u));
      }
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int u = u0 + 32 * m;
        if (u >= slots) continue;
        const PairSlot ps = pair_slot(u, d.N, d.S, d.mimo);
        const float ca = cv[m].x, cb = cv[m].y, ka = kv[m].x, kb = kv[m].y;
        if (ps.rot) {
          const float c = rot[m].x, sv = rot[m].y;
          store_pair(q, ps, vec, ca * c - cb * sv, ca * sv + cb * c);
          store_pair(k, ps, vec, ka * c - kb * sv, ka * sv + kb * c);
        } else {
          store_pair(q, ps, vec, ca, cb);
          store_pair(k, ps, vec, ka, kb);
        }
      }
    }
    const int64_t tok = int64_t(ix.b) * d.L + t, xcol = d.off_x + int64_t(ix.h) * d.P;
    const float* mx = d.mimo ? p.mimo_x + (int64_t(ix.h) * d.R + r) * d.P : nullptr;
    const float w = dtv[tl];
    for (int e0 = lane; e0 < d.P; e0 += 64) {
      float val[2];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int e = e0 + 32 * m;
        const float x = e < d.P ? zx_col(p, tok, xcol + e) : 0.0f;
        val[m] = e < d.P ? (mx ? mx[e] * x : x) : 0.0f;
      }
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int e = e0 + 32 * m;
        if (e < d.P) v[e] = from_f<In>(val[m]), vw[e] = from_f<In>(w * val[m]);
      }
    }
  }
}

// coef(t, s) of spec §5.3: e^{Λ_t − Λ_s}·scale_s below the token diagonal, γ_t on it, 0 above.
__device__ __forceinline__ float coef_at(const float* Lam, const float* scale, const float* gam, int tl, int sl) {
  if (sl < tl) return expf(Lam[tl] - Lam[sl]) * scale[sl];
  return sl == tl ? gam[tl] : 0.0f;
}

__device__ __forceinline__ void stage_scalars(const BatchedParams& p, int64_t chunk, float* Lam, float* scale,
                                              float* gam) {
  for (int tl = threadIdx.x; tl < p.T; tl += kThreads) {
    const int64_t i = chunk * p.T + tl;
    Lam[tl] = p.Lam[i], scale[tl] = p.scale[i], gam[tl] = p.gam[i];
  }
}

template <typename In>
__global__ void __launch_bounds__(kThreads) batched_mask_kernel(const BatchedParams p) {
  pdl_wait();
  const int64_t chunk = blockIdx.x;
  const int T = p.T, rows = p.rows, R = p.d.R;
  extern __shared__ float sm[];
  float *Lam = sm, *scale = sm + T, *gam = sm + 2 * T;
  stage_scalars(p, chunk, Lam, scale, gam);
  __syncthreads();
  const int64_t base = chunk * rows * rows;
  constexpr int kE = 4;  // entries per thread at a time: their loads before their stores
  for (int e0 = threadIdx.x; e0 < rows * rows; e0 += kThreads * kE) {
    float sv[kE];
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const int e = e0 + k * kThreads;
      sv[k] = e < rows * rows ? p.S[base + e] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const int e = e0 + k * kThreads, j = e / rows, jj = e % rows;
      if (e < rows * rows)
        static_cast<In*>(p.W)[base + e] = from_f<In>(sv[k] * coef_at(Lam, scale, gam, j / R, jj / R));
    }
  }
}

// Warp per token. Per warp in shared memory: y and dyn (R·P each) and the partial sums of mimo_z, mimo_o (R·P each)
// and the norm weight (P) owned lane by lane; the backward also keeps the token's Z and v rows (R·P each), so that
// its last phase reads no global memory after its stores. Loads are grouped ahead of stores throughout: a global load
// after a float store waits for it (the compiler cannot tell the pointers apart), one memory latency per store.
template <bool kBwd, typename In>
__global__ void __launch_bounds__(kThreads) batched_output_kernel(const BatchedParams p) {
  pdl_wait();
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int R = d.R, P = d.P, RP = R * P, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* nw = d.outnorm ? p.norm + int64_t(ix.h) * P : nullptr;
  const float Dh = p.D[ix.h];
  const In* V = static_cast<const In*>(p.V);
  In *dY = static_cast<In*>(p.dY), *dYe = static_cast<In*>(p.dYe);
  extern __shared__ float sm[];
  const int per_warp = (kBwd ? 6 : 4) * RP + P;
  float* ys = sm + warp * per_warp;
  float *dyn = ys + RP, *gz = ys + 2 * RP, *go = ys + 3 * RP, *gn = ys + 4 * RP;
  float *zrow = gn + P, *vrow = zrow + RP;  // backward only
  for (int e = lane; e < per_warp - RP; e += 32) dyn[e] = 0.0f;  // dyn, gz, go, gn
  float gD = 0.0f;
  __syncwarp();
  for (int tl = warp; tl < p.T; tl += kWarps) {
    const int64_t row0 = (ix.chunk * p.rows + int64_t(tl) * R) * P;  // this token's first chunk row
    if (tl >= ix.Tc) {
      if (kBwd) {
        for (int e = lane; e < RP; e += 32) dY[row0 + e] = from_f<In>(0.0f), dYe[row0 + e] = from_f<In>(0.0f);
        if (lane == 0) p.dLam[ix.chunk * p.T + tl] = 0.0f;
      }
      continue;
    }
    const float e = p.eL[ix.chunk * p.T + tl];
    float rstd[kMaxRank];
    for (int r = 0; r < R; ++r) {
      float ss = 0.0f;
      for (int q = lane; q < P; q += 32) {
        const int64_t i = row0 + r * P + q;
        const float zv = p.Z[i], vv = to_f(V[i]);
        const float y = (e * zv + Dh * vv) + p.WV[i];
        ys[r * P + q] = y;
        if (kBwd) zrow[r * P + q] = zv, vrow[r * P + q] = vv;
        ss += y * y;
      }
      rstd[r] = nw ? 1.0f / sqrtf(warp_sum(ss) / float(P) + kEps) : 1.0f;
    }
    const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + tl;
    // Channels per lane at a time: their loads, then their stores (the forward stays at one: at 40 registers it
    // runs 6 blocks per SM, and grouping cost it 0.207 → 0.242 ms per layer at 125M).
    constexpr int kQ = kBwd ? 2 : 1;
    for (int q0 = lane; q0 < P; q0 += 32 * kQ) {
      float zq[kQ], dOq[kQ], oq[kQ], dzq[kQ];
#pragma unroll
      for (int k = 0; k < kQ; ++k) {
        const int q = q0 + 32 * k;
        zq[k] = q < P ? zx_col(p, tok, int64_t(ix.h) * P + q) : 0.0f;
        dOq[k] = kBwd && q < P ? dO_at(p, tok * d.d_inner + int64_t(ix.h) * P + q) : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < kQ; ++k) {
        const int q = q0 + 32 * k;
        float o = 0.0f, dz = 0.0f;
        if (q < P) {
          const float z = zq[k];
          if (!d.mimo) {
            const float y = ys[q], yn = nw ? y * rstd[0] * nw[q] : y;
            const float sg = gate_sigmoid_f(z, p.bf16), si = z * sg;
            o = yn * si;
            if (kBwd) {
              dyn[q] = dOq[k] * si;
              dz = dOq[k] * yn * sg * (1.0f + z * (1.0f - sg));
            }
          } else {
            for (int r = 0; r < R; ++r) {
              const float y = ys[r * P + q], yn = nw ? y * rstd[r] * nw[q] : y;
              const int64_t i = (int64_t(ix.h) * R + r) * P + q;
              const MimoGate mg = mimo_gate(yn, z, p.mimo_z[i], p.mimo_o[i], dOq[k], p.bf16);
              o += mg.o;
              if (kBwd) {
                go[r * P + q] += mg.go;
                dyn[r * P + q] = mg.dyn;
                gz[r * P + q] += mg.gz;
                dz += mg.dz;
              }
            }
          }
        }
        oq[k] = o, dzq[k] = dz;
      }
#pragma unroll
      for (int k = 0; k < kQ; ++k) {
        const int q = q0 + 32 * k;
        if (q >= P) continue;
        const int64_t oi = tok * d.d_inner + int64_t(ix.h) * P + q;
        if (p.o) p.o[oi] = oq[k];
        if (p.o16) static_cast<__nv_bfloat16*>(p.o16)[oi] = __float2bfloat16_rn(oq[k]);
        if (kBwd) {
          const int64_t zi = tok * d.din + int64_t(ix.h) * P + q;  // dzx's z column
          if (p.dzx16) reinterpret_cast<__nv_bfloat16*>(p.dzx16)[zi] = __float2bfloat16_rn(dzq[k]);
          else p.dzx[zi] = dzq[k];
        }
      }
    }
    if (!kBwd) continue;
    __syncwarp();
    float dl = 0.0f;
    for (int r = 0; r < R; ++r) {
      float mean = 0.0f;
      if (nw) {
        for (int q = lane; q < P; q += 32) mean += dyn[r * P + q] * nw[q] * (ys[r * P + q] * rstd[r]);
        mean = warp_sum(mean) / float(P);
      }
      float dot = 0.0f;
      for (int q = lane; q < P; q += 32) {
        const float dn = dyn[r * P + q];
        float v = dn;
        if (nw) {
          const float xh = ys[r * P + q] * rstd[r];
          gn[q] += dn * xh;
          v = rstd[r] * (dn * nw[q] - xh * mean);
        }
        const int64_t i = row0 + r * P + q;
        dY[i] = from_f<In>(v), dYe[i] = from_f<In>(e * v);
        dot += v * zrow[r * P + q];
        gD += v * vrow[r * P + q];
      }
      dl += e * warp_sum(dot);
    }
    if (lane == 0) p.dLam[ix.chunk * p.T + tl] = dl;
    __syncwarp();  // ys/dyn are rewritten by the next token
  }
  if (!kBwd) return;
  gD = warp_sum(gD);
  __syncthreads();
  float* wD = sm + kWarps * per_warp;
  if (lane == 0) wD[warp] = gD;
  __syncthreads();
  const int64_t prow = ix.prow(p);
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += wD[w];
    p.part_D[prow] = s;
  }
  if (d.mimo)
    for (int e = threadIdx.x; e < RP; e += kThreads) {
      float sz = 0.0f, so = 0.0f;
      for (int w = 0; w < kWarps; ++w) sz += sm[w * per_warp + 2 * RP + e], so += sm[w * per_warp + 3 * RP + e];
      p.part_mimo_z[prow * RP + e] = sz, p.part_mimo_o[prow * RP + e] = so;
    }
  if (nw)
    for (int q = threadIdx.x; q < P; q += kThreads) {
      float s = 0.0f;
      for (int w = 0; w < kWarps; ++w) s += sm[w * per_warp + 4 * RP + q];
      p.part_norm[prow * P + q] = s;
    }
}

// The gradient of coef from S = q·kᵀ and dWf = dy·vᵀ: per entry gc = dW·S; below the token diagonal G = gc·coef goes
// to Λ_t (+) and Λ_s (−) and gc·e^{Λ_t − Λ_s} to scale_s; on it gc goes to γ_t. And dS = dW ⊙ coef.
template <typename In>
__global__ void __launch_bounds__(kThreads) batched_coef_kernel(const BatchedParams p) {
  pdl_wait();
  const ChunkIndex ix(p);
  const int T = p.T, rows = p.rows, R = p.d.R, ld = rows + 1;
  extern __shared__ float sm[];
  float *Lam = sm, *scale = sm + T, *gam = sm + 2 * T;
  float *rowG = sm + 3 * T, *rowD = rowG + rows, *colG = rowD + rows, *colE = colG + rows;
  float *sG = colE + rows, *sE = sG + rows * ld;
  stage_scalars(p, ix.chunk, Lam, scale, gam);
  __syncthreads();
  const int64_t base = ix.chunk * rows * rows;
  constexpr int kE = 4;  // entries per thread at a time: their loads before their stores
  for (int e0 = threadIdx.x; e0 < rows * rows; e0 += kThreads * kE) {
    float sv[kE], dwv[kE];
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const int e = e0 + k * kThreads;
      sv[k] = e < rows * rows ? p.S[base + e] : 0.0f;
      dwv[k] = e < rows * rows ? p.dWf[base + e] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const int e = e0 + k * kThreads;
      if (e >= rows * rows) break;
      const int j = e / rows, jj = e % rows, tl = j / R, sl = jj / R;
      const float s = sv[k], dw = dwv[k], gc = dw * s;
      float cf = 0.0f, G = 0.0f, E = 0.0f;
      if (sl < tl) {
        const float ex = expf(Lam[tl] - Lam[sl]);
        cf = ex * scale[sl], G = gc * cf, E = gc * ex;
      } else if (sl == tl) {
        cf = gam[tl], G = gc;  // the diagonal's gc, told apart by its index below
      }
      sG[j * ld + jj] = G, sE[j * ld + jj] = E;
      static_cast<In*>(p.dS)[base + e] = from_f<In>(dw * cf);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * rows; i += kThreads) {
    if (i < rows) {  // row j: Σ G left of the token diagonal, Σ gc on it
      const int j = i, tl = j / R;
      float g = 0.0f, dg = 0.0f;
      for (int jj = 0; jj < tl * R; ++jj) g += sG[j * ld + jj];
      for (int jj = tl * R; jj < tl * R + R; ++jj) dg += sG[j * ld + jj];
      rowG[j] = g, rowD[j] = dg;
    } else {  // column jj: Σ G and Σ gc·e below the token diagonal
      const int jj = i - rows, sl = jj / R;
      float g = 0.0f, ee = 0.0f;
      for (int j = (sl + 1) * R; j < rows; ++j) g += sG[j * ld + jj], ee += sE[j * ld + jj];
      colG[jj] = g, colE[jj] = ee;
    }
  }
  __syncthreads();
  for (int tl = threadIdx.x; tl < ix.Tc; tl += kThreads) {
    float dl = 0.0f, dg = 0.0f, ds = 0.0f;
    for (int r = 0; r < R; ++r) {
      const int j = tl * R + r;
      dl += rowG[j] - colG[j], dg += rowD[j], ds += colE[j];
    }
    p.dLam[ix.chunk * T + tl] += dl;
    const int64_t st = ix.bh * p.d.L + ix.c0 + tl;
    p.dgam[st] = dg, p.dscale[st] = ds;
  }
}

// Per chunk: dV ← dV + D·dy + w ⊙ tp (tp = K·dHᵀ, in Z), the state-carry terms of Λ and scale and dadt, dx and the
// mimo_x partials (one block per (sequence, head, chunk)). The rotation backward of dQ, dK is the next kernel's.
template <typename In>
__global__ void __launch_bounds__(kThreads, 4) batched_epilogue_kernel(const BatchedParams p) {
  pdl_wait();
  const MixerDims& d = p.d;
  const ChunkIndex ix(p);
  const int T = p.T, rows = p.rows, R = d.R, P = d.P, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float Dh = p.D[ix.h];
  const In *V = static_cast<const In*>(p.V), *dY = static_cast<const In*>(p.dY);
  extern __shared__ float sm[];
  float *Lam = sm, *scale = sm + T, *dL = sm + 2 * T, *rdot = sm + 3 * T, *wsum = rdot + rows;
  float* gXall = wsum + kWarps;  // per warp: gX (R·P)
  const int RP = R * P;
  for (int tl = threadIdx.x; tl < T; tl += kThreads) {
    const int64_t i = ix.chunk * T + tl;
    Lam[tl] = p.Lam[i], scale[tl] = p.scale[i], dL[tl] = p.dLam[i];
  }
  if (d.mimo)
    for (int e = threadIdx.x; e < kWarps * RP; e += kThreads) gXall[e] = 0.0f;
  __syncthreads();  // the partials are zero before any warp adds to them
  // A warp per token: each rank row's final dv = (dv + D·dy) + w ⊙ tp and Σ v·tp, then dx = Σ_r mimo_x ⊙ dv and the
  // mimo_x partials (dv itself is not stored: nothing else reads it).
  const int64_t base_p = ix.chunk * rows * P;
  float* gX = gXall + warp * RP;
  for (int tl = warp; tl < T; tl += kWarps) {
    const float w = p.wv[ix.chunk * T + tl];
    const bool real = tl < ix.Tc;
    const int64_t tok = int64_t(ix.b) * d.L + ix.c0 + tl;
    const int64_t xcol = d.off_x + int64_t(ix.h) * P;
    float dots[kMaxRank];
    for (int r = 0; r < R; ++r) dots[r] = 0.0f;
    // kQ channels per lane at a time, their dzx stores after all their loads (a global load after a float store
    // would wait for it: the compiler cannot tell the pointers apart).
    constexpr int kQ = 2;
    for (int q0 = lane; q0 < P; q0 += 32 * kQ) {
      float dxs[kQ];
#pragma unroll
      for (int k = 0; k < kQ; ++k) {
        const int q = q0 + 32 * k;
        float dx = 0.0f;
        if (q < P)
          for (int r = 0; r < R; ++r) {
            const int64_t i = base_p + (int64_t(tl) * R + r) * P + q;
            const float tp = p.Z[i];
            dots[r] += to_f(V[i]) * tp;
            const float dv = (p.dV[i] + Dh * to_f(dY[i])) + w * tp;
            if (d.mimo) {
              dx += dv * p.mimo_x[(int64_t(ix.h) * R + r) * P + q];
              if (real) gX[r * P + q] += dv * zx_col(p, tok, xcol + q);
            } else {
              dx += dv;
            }
          }
        dxs[k] = dx;
      }
      if (real)
#pragma unroll
        for (int k = 0; k < kQ; ++k) {
          if (q0 + 32 * k >= P) continue;
          const int64_t xi = tok * d.din + d.off_x + int64_t(ix.h) * P + q0 + 32 * k;  // dzx's x column
          if (p.dzx16) reinterpret_cast<__nv_bfloat16*>(p.dzx16)[xi] = __float2bfloat16_rn(dxs[k]);
          else p.dzx[xi] = dxs[k];
        }
    }
    for (int r = 0; r < R; ++r) {
      const float dot = warp_sum(dots[r]);
      if (lane == 0) rdot[tl * R + r] = dot;
    }
  }
  epilogue_state_tail(p, ix, Lam, scale, dL, rdot, wsum, gXall);
}

// The rotation and bias backward of dQ, dK → dCn, dBn (summed over the block's heads), dphi and the bias partials.
// Block (b, head slot, c) takes heads [slot·hb, (slot + 1)·hb) of one B/C group, hb = p.heads_per_block; a warp per
// token row, a lane per rotary slot, the heads in the innermost loop with their sums in registers: one write of each
// dCn/dBn element per head slot, (M, H / hb, R, N), instead of one per head (the rows the B/C norm backward reads).
// The bias partials (per head) go through shared memory: per warp and head, R·N each for C and B.
template <typename In>
__global__ void __launch_bounds__(kThreads) batched_rotation_backward_kernel(const BatchedParams p) {
  pdl_wait();
  const MixerDims& d = p.d;
  const int hb = p.heads_per_block, slots = d.H / hb, R = d.R, N = d.N, S = d.S, RN = R * N, rows = p.rows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = int(blockIdx.x % p.nc), slot = int(blockIdx.x / p.nc % slots), b = int(blockIdx.x / p.nc / slots);
  const int c0 = c * p.T, Tc = min(p.T, d.L - c0), h0 = slot * hb;
  // Distinct buffers, said so: the next head's loads need not wait for this head's dφ store.
  const In *__restrict__ Q = static_cast<const In*>(p.Q), *__restrict__ K = static_cast<const In*>(p.K);
  const float *__restrict__ dQ = p.dQ, *__restrict__ dK = p.dK;
  const float* __restrict__ phiv = p.phi;
  const uint16_t* __restrict__ codes = p.phi_code;
  float *__restrict__ dphi_out = p.dphi, *__restrict__ dCn = p.dCn, *__restrict__ dBn = p.dBn;
  extern __shared__ float sm[];  // (kWarps, hb, 2, R·N): gC then gB per warp and head
  for (int e = threadIdx.x; e < kWarps * hb * 2 * RN; e += kThreads) sm[e] = 0.0f;
  __syncthreads();
  float* mine = sm + warp * hb * 2 * RN;
  const bool vec = !d.mimo && N % 2 == 0;  // chunk rows hold N values at N-value offsets: aligned pairs for even N
  for (int tl = warp; tl < Tc; tl += kWarps) {
    const int64_t t = c0 + tl, tok = int64_t(b) * d.L + t;
    for (int u = lane; u < (N + 1) / 2; u += 32) {
      const PairSlot ps = pair_slot(u, N, S, d.mimo);
      for (int r = 0; r < R; ++r) {
        float sCa = 0.0f, sCb = 0.0f, sBa = 0.0f, sBb = 0.0f;  // the slot's pairs summed over the block's heads
        for (int hh = 0; hh < hb; ++hh) {
          const int64_t bh = int64_t(b) * d.H + h0 + hh, chunk = bh * p.nc + c, st = bh * d.L + t;
          const int64_t j = (chunk * rows + int64_t(tl) * R + r) * N;
          const float2 gq = load_pair(dQ + j, ps, vec), gk = load_pair(dK + j, ps, vec);
          float ca = gq.x, cb = gq.y, ba = gk.x, bb = gk.y;
          if (ps.rot) {
            const float2 vq = load_pair(Q + j, ps, vec), vk = load_pair(K + j, ps, vec);
            const float2 rot = rotary_cos_sin(angle_at(phiv, codes, st * S + u));
            const float cs = rot.x, sn = rot.y;
            // dφ of the slot's angle, summed over the ranks q then k per rank (the CPU's order); a later rank adds
            // to what this lane wrote for the earlier ones.
            float* dphi = dphi_out + st * S + u;
            float acc = r == 0 ? 0.0f : *dphi;
            acc += gq.y * vq.x - gq.x * vq.y;
            acc += gk.y * vk.x - gk.x * vk.y;
            *dphi = acc;
            ca = gq.x * cs + gq.y * sn, cb = gq.y * cs - gq.x * sn;
            ba = gk.x * cs + gk.y * sn, bb = gk.y * cs - gk.x * sn;
          }
          float* gC = mine + (hh * 2) * RN + r * N;
          float* gB = gC + RN;
          gC[ps.a] += ca, gB[ps.a] += ba;
          if (ps.has_b) gC[ps.b] += cb, gB[ps.b] += bb;
          sCa += ca, sCb += cb, sBa += ba, sBb += bb;
        }
        const int64_t out = ((tok * slots + slot) * R + r) * N;
        store_pair(dCn + out, ps, vec, sCa, sCb);
        store_pair(dBn + out, ps, vec, sBa, sBb);
      }
    }
  }
  __syncthreads();
  write_bias_partials(p, sm, b, c, h0, hb, RN);
}

}  // namespace

void launch_batched_build(cudaStream_t s, const BatchedParams& p) {
  if (batched::launch_build_siso(s, p) || batched::launch_build_mimo(s, p)) return;  // the instances, where they apply
  if (p.bf16) launch_per_chunk(batched_build_kernel<__nv_bfloat16>, s, p, size_t(3 * p.T));
  else launch_per_chunk(batched_build_kernel<float>, s, p, size_t(3 * p.T));
}

void launch_batched_mask(cudaStream_t s, const BatchedParams& p) {
  if (p.bf16) launch_per_chunk(batched_mask_kernel<__nv_bfloat16>, s, p, size_t(3 * p.T));
  else launch_per_chunk(batched_mask_kernel<float>, s, p, size_t(3 * p.T));
}

void launch_batched_output(cudaStream_t s, const BatchedParams& p, bool backward) {
  if (backward && batched::launch_output_backward_siso(s, p)) return;  // the instances, where they apply
  if (batched::launch_output_mimo(s, p, backward)) return;
  MAMBA3_CHECK(!p.wv_holds_y, "batched output: WV holds y, but the MIMO output instance does not apply");
  const size_t floats = size_t(kWarps) * ((backward ? 6 : 4) * p.d.R * p.d.P + p.d.P) + kWarps;
  if (p.bf16) {
    if (backward) launch_per_chunk(batched_output_kernel<true, __nv_bfloat16>, s, p, floats);
    else launch_per_chunk(batched_output_kernel<false, __nv_bfloat16>, s, p, floats);
  } else {
    if (backward) launch_per_chunk(batched_output_kernel<true, float>, s, p, floats);
    else launch_per_chunk(batched_output_kernel<false, float>, s, p, floats);
  }
}

void launch_batched_coef(cudaStream_t s, const BatchedParams& p) {
  const size_t floats = size_t(3 * p.T + 4 * p.rows + 2 * p.rows * (p.rows + 1));
  if (p.bf16) launch_per_chunk(batched_coef_kernel<__nv_bfloat16>, s, p, floats);
  else launch_per_chunk(batched_coef_kernel<float>, s, p, floats);
}

void launch_batched_epilogue(cudaStream_t s, const BatchedParams& p) {
  MAMBA3_CHECK(!p.epilogue_in_core, "batched epilogue: the state core ran it already");
  const size_t floats = size_t(3 * p.T + p.rows + kWarps) + size_t(kWarps) * p.d.R * p.d.P;
  if (batched::launch_epilogue_mimo(s, p, floats)) {  // the MIMO instance, where it applies
  } else if (p.bf16) {
    launch_per_chunk(batched_epilogue_kernel<__nv_bfloat16>, s, p, floats);
  } else {
    launch_per_chunk(batched_epilogue_kernel<float>, s, p, floats);
  }
  launch_batched_rotation_backward(s, p);
}

bool epilogue_mimo_applies(const BatchedParams& p) { return batched::epilogue_mimo_instance_applies(p); }

bool output_mimo_applies(const BatchedParams& p) { return batched::output_mimo_instance_applies(p); }

bool rotation_backward_fuses_bc_norm(const BatchedParams& p) { return batched::rotation_bc_norm_siso_applies(p); }

bool rotation_backward_writes_angle_totals(const BatchedParams& p) { return batched::rotation_totals_siso_applies(p); }

void launch_batched_rotation_backward(cudaStream_t s, const BatchedParams& p) {
  const int hb = p.heads_per_block;
  MAMBA3_CHECK(hb >= 1 && (p.d.H / p.d.G) % hb == 0,
               "batched rotation backward: {} heads per block must divide the {} heads of a B/C group", hb,
               p.d.H / p.d.G);
  const int64_t blocks = int64_t(p.d.B) * (p.d.H / hb) * p.nc;
  MAMBA3_CHECK(blocks <= 0x7fffffff, "batched rotation backward: {} blocks exceed the grid", blocks);
  // The instances, where they apply.
  if (batched::launch_rotation_backward_siso(s, p) || batched::launch_rotation_backward_mimo(s, p)) return;
  MAMBA3_CHECK(!p.dqk_unrotated, "batched rotation backward: un-rotated dQ/dK need the SISO instance");
  MAMBA3_CHECK(!p.qk_rotated_only, "batched rotation backward: q and k stored in part need the SISO instance");
  MAMBA3_CHECK(!p.dQ16 && !p.dK16, "batched rotation backward: bf16 dQ/dK need an instance (dqk16_supported)");
  const size_t bytes = size_t(kWarps) * hb * 2 * p.d.R * p.d.N * sizeof(float);
  const auto kernel = p.bf16 ? batched_rotation_backward_kernel<__nv_bfloat16> : batched_rotation_backward_kernel<float>;
  if (bytes > 48 * 1024)
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  launch_train(kernel, unsigned(blocks), kThreads, bytes, s, p);
  MAMBA3_LAUNCH_CHECK();
}

bool dqk16_supported(const BatchedParams& p) {
  return batched::rotation_backward_siso_applies(p) || batched::rotation_backward_mimo_applies(p);
}

bool rotation_backward_reads_unrotated(const BatchedParams& p) { return batched::rotation_bc_norm_siso_applies(p); }

}  // namespace mamba3::cuda::train_detail
