#include "cuda/mamba3_chunk_gpu.h"
#include "cuda/mamba3_gpu_math.cuh"

#include <algorithm>

#include <cuda_bf16.h>

#include "cuda/cuda_check.h"

namespace mamba3::cuda {
namespace {

// The chunk decomposition (spec §5.3, regrouped so that the carried state is the exact recurrent state h):
// a chunk holds the previous token (local index i = 0: the previous chunk's last token, or k_{−1}, x_{−1} at the
// segment start) and Tc new tokens i = 1..Tc, each with R rows j = i·R + r (at most kRows rows). With the in-chunk
// prefix Λ_0 = 0, Λ_i = Σ_{m=1..i} A·Δ of token m, g_i = γ_i (g_0 = 0: the previous token's γ part is already in h)
// and β_i as staged (β_{Tc+1} = 0: it belongs to the next chunk, whose row 0 is this chunk's last token),
// unrolling h_t = α_t h_{t−1} + β_t u_{t−1} + γ_t u_t (u_s = Σ_r v_{s,r} k_{s,r}ᵀ) gives, for i ≥ 1,
//   h_i = e^{Λ_i}·h_0 + Σ_{j ≤ i} c(i, j)·u_j,   c(i, i) = g_i,
//   c(i, j < i) = e^{Λ_i − Λ_j}·g_j + e^{Λ_i − Λ_{j+1}}·β_{j+1}   (both exponents ≤ 0: differences only),
//   y_{i,r} = e^{Λ_i}·h_0·q_{i,r} + Σ_{j ≤ i, r'} c(i, j)·(q_{i,r}·k_{j,r'})·v_{j,r'} + D·v_{i,r},
//   h_Tc = e^{Λ_Tc}·h_0 + Σ_j w_j·u_j,   w_j = c(Tc, j).
// (e^{Λ_i − Λ_{j+1}}·β_{j+1} is spec §5.1's e^{Λ_i − Λ_j}·σ̄_{j+1} with σ̄ = β/α, written without the division, which
// would fail once α underflows.) The β term of every chunk's first token pairs with row 0's k, v (the previous
// token), and of the segment's first token with k_{−1} (stage slot 0) and x_{−1} (the v state). Checked against the
// recurrence by a host emulation of this kernel's tile loops and m16n8k16 fragment layouts (f32: 1.4e-6; bf16
// operands: 5e-3 relative, R = 1–4, N 16–256, P 16–128, 1–130 tokens).
constexpr int kRows = 64;            // rows (token, rank) per chunk, the previous token's R rows included
constexpr int kLdRows = kRows + 8;   // bf16 stride of the matrices whose k axis is the chunk's rows (conflict-free)
constexpr int kThreads = 256;        // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxNTiles = 8;        // n8 tiles per warp in the y product: PS/16 ≤ 8
constexpr int kScal = 72;            // floats per per-token scalar array (≥ kRows + 2)

// Shared-memory layout of one block (byte offsets, 16-byte aligned). Strides ≡ 8 (mod 16) elements make every
// fragment load/store of a warp hit 32 distinct banks (row stride in words ≡ 4 mod 8, or ≡ 8/24 mod 32 for f32 pairs).
struct ChunkLayout {
  int Np, PS, slices, ldN, ldY;
  size_t h, qk, kwt, vt, w, scal, mimo, total;
};

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

ChunkLayout chunk_layout(int N, int P, int R, bool outnorm) {
  ChunkLayout l{};
  const int rmax = R == 1 ? 1 : 4;
  const int Pp = (P + 15) / 16 * 16;
  l.Np = (N + 15) / 16 * 16;
  l.slices = !outnorm && Pp > 64 ? 2 : 1;
  l.PS = ((Pp + l.slices - 1) / l.slices + 15) / 16 * 16;
  l.ldN = l.Np + 8;
  l.ldY = l.PS + 8;
  size_t at = 0;
  l.h = at;                                                   // f32 (PS, ldN): the carried state of the slice
  at += align16(size_t(l.PS) * l.ldN * 4);
  l.qk = at;                                                  // bf16 Q, K (kRows, ldN) each; later f32 Y (kRows, ldY)
  at += align16(std::max(size_t(2) * kRows * l.ldN * 2, size_t(kRows) * l.ldY * 4));
  l.kwt = at;                                                 // bf16 (Np, kLdRows): w_j·k_j transposed
  at += align16(size_t(l.Np) * kLdRows * 2);
  l.vt = at;                                                  // bf16 (PS, kLdRows): v transposed
  at += align16(size_t(l.PS) * kLdRows * 2);
  l.w = at;                                                   // bf16 (kRows, kLdRows): masked, weighted scores
  at += align16(size_t(kRows) * kLdRows * 2);
  l.scal = at;                                                // f32 Λ, g, β, w: 4 × kScal
  at += align16(size_t(4) * kScal * 4);
  l.mimo = at;                                                // f32 mimo_x, mimo_z, mimo_o of the slice: 3 × (rmax, PS)
  at += align16(size_t(3) * rmax * l.PS * 4);
  l.total = at;
  return l;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half, the lower k index
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t ld32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// d += a·b, one m16n8k16 tile, bf16 operands, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragment of the 16×16 tile at (m0, k0) of a row-major [m][k] bf16 matrix (lane = 4g + tq): registers hold
// (m0+g, k0+2tq..+1), (m0+g+8, same k), (m0+g, k0+8+2tq..+1), (m0+g+8, k0+8+2tq..+1).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* A, int ld, int m0, int k0, int g,
                                       int tq) {
  const __nv_bfloat16* p = A + (m0 + g) * ld + k0 + 2 * tq;
  a[0] = ld32(p);
  a[1] = ld32(p + 8 * ld);
  a[2] = ld32(p + 8);
  a[3] = ld32(p + 8 * ld + 8);
}

// B fragment of the 16×8 tile at (k0, n0) of B stored as [n][k] bf16 (B column-major): (k0+2tq..+1, n0+g) and
// (k0+8+2tq..+1, n0+g).
__device__ __forceinline__ void load_b(uint32_t& b0, uint32_t& b1, const __nv_bfloat16* B, int ld, int n0, int k0,
                                       int g, int tq) {
  const __nv_bfloat16* p = B + (n0 + g) * ld + k0 + 2 * tq;
  b0 = ld32(p);
  b1 = ld32(p + 8);
}

// c(i, j) of the header for rows i, j (0 outside the chunk's rows, for the previous token's output rows and above the
// token diagonal).
__device__ __forceinline__ float chunk_coef(int i, int j, int rows, int R, const float* lam, const float* gam,
                                            const float* bet) {
  if (i >= rows || j >= rows) return 0.0f;
  const int ti = i / R, tj = j / R;
  if (ti == 0 || tj > ti) return 0.0f;
  if (tj == ti) return gam[ti];
  return __expf(lam[ti] - lam[tj]) * gam[tj] + __expf(lam[ti] - lam[tj + 1]) * bet[tj + 1];
}

// Row tiles of 16 a W row tile `it` reaches: up to the last rank row of the token of its last row (one past the
// diagonal tile when R = 3, whose tokens straddle tile boundaries), within the chunk's mt tiles.
__device__ __forceinline__ int row_tiles_reached(int it, int R, int mt) {
  const int last = ((it * 16 + 15) / R + 1) * R - 1;
  return min(mt, last / 16 + 1);
}

// for (e = tid; e < total; e += kThreads) store(e, load(e)), U items per thread at a time: the loads of all U (the
// index clamped to total − 1 for the tail) are issued before the first store, so that a thread waits on global-memory
// latency once per U items rather than once per item. load only reads memory; store does the math and the writes.
template <int U, class Load, class Store>
__device__ __forceinline__ void grouped_loop(int total, Load load, Store store) {
  for (int e0 = int(threadIdx.x); e0 < total; e0 += U * kThreads) {
    decltype(load(0)) v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = load(min(e0 + u * kThreads, total - 1));
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (e0 + u * kThreads < total) store(e0 + u * kThreads, v[u]);
  }
}

// Elements n, n + 1 (n even) of a row of N floats, s pointing at n, into x0, x1 where inside the row (x0, x1 are left
// as they are elsewhere): one float2 load when `vec` (N even and s 8-byte aligned; n < N then covers n + 1).
__device__ __forceinline__ void load_pair(const float* s, int n, int N, bool vec, float& x0, float& x1) {
  if (vec) {
    if (n < N) {
      const float2 v = *reinterpret_cast<const float2*>(s);
      x0 = v.x, x1 = v.y;
    }
  } else {
    if (n < N) x0 = s[0];
    if (n + 1 < N) x1 = s[1];
  }
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// One block per (b, h, channel slice [p0, p0 + PS)); 8 warps; chunks of Tc = 64/R − 1 new tokens (64 rows with the
// previous token's). Per chunk (M = 16·⌈rows/16⌉ ≤ 64 rows):
//   1. warp 0: Λ (warp scan of A·Δ), g, β, w_j; all: Q, K (kRows, Np) bf16, Kwt = (w ⊙ K)ᵀ (Np, M), Vt = Vᵀ (PS, M).
//   2. S = Q·Kᵀ on the 16×8 tiles on and below the token diagonal (flat list over warps), ⊙ c(i, j) → W (M, M) bf16.
//   3. Y = e^{Λ}⊙(Q·Hᵀ) + W·V: warp (it = w mod 4, half = w / 4) owns rows [16it, 16it + 16) × channels
//      [half·PS/2, +PS/2) (PS/16 n8 tiles in registers); H enters as bf16 pairs converted from the f32 state.
//   4. H ← e^{Λ_Tc}·H + Vt·Kwtᵀ: (16-channel × 16-state) items over warps, accumulators loaded from and stored to the
//      f32 state. (Y goes to shared memory over Q, K in the same barrier interval.)
//   5. Output stage (spec §7), a warp per token: y + D·v, per-head RMS norm, gate, MIMO contraction → o.
// Barriers per chunk: 6. Cost per chunk and head (M rows): 2·M·M/2·N (QKᵀ, causal half) + 2·M·P·N (Q·Hᵀ)
// + 2·M·M/2·P (W·V) + 2·P·N·M (state) FLOPs on tensor cores; 1.5B (N 128, P 64, R 1): 752 mma = 3.1 MFLOP per 63
// tokens, ≈ 49 kFLOP per token and head (≈ 6 % of the layer's in/out projections). Bytes per token and head: reads
// q, k (2·R·N f32), x, z (2·P f32), 4 scalars; writes o (P bf16); plus the P×N f32 state read and written once per
// segment. Shared memory (1.5B): 108 KB → 2 blocks per SM; registers (nvcc 13, sm_90): 92 (R = 1) / 80, no spill.
// Fragment loads and stores are conflict-free (strides above); the transposed 2-byte stores of Kwt and Vt in step 1
// are 8-way conflicted (a next step: stage them through registers and stmatrix/ldmatrix.trans).
template <int RMAX>
__global__ void __launch_bounds__(kThreads) mamba3_chunk_kernel(const Mamba3ChunkArgs a, const ChunkLayout l) {
  extern __shared__ float4 smem4[];
  char* smem = reinterpret_cast<char*>(smem4);
  float* Hs = reinterpret_cast<float*>(smem + l.h);
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem + l.qk);
  __nv_bfloat16* Ks = Qs + kRows * l.ldN;
  float* Ys = reinterpret_cast<float*>(smem + l.qk);  // over Q, K once steps 2–3 have read them
  __nv_bfloat16* Kwt = reinterpret_cast<__nv_bfloat16*>(smem + l.kwt);
  __nv_bfloat16* Vt = reinterpret_cast<__nv_bfloat16*>(smem + l.vt);
  __nv_bfloat16* Ws = reinterpret_cast<__nv_bfloat16*>(smem + l.w);
  float* lam = reinterpret_cast<float*>(smem + l.scal);
  float* gam = lam + kScal;
  float* bet = gam + kScal;
  float* wst = bet + kScal;
  float* mx = reinterpret_cast<float*>(smem + l.mimo);
  float* mz = mx + RMAX * l.PS;
  float* mo = mz + RMAX * l.PS;

  const int H = a.H, P = a.P, N = a.N, R = a.R, Np = l.Np, PS = l.PS, ldN = l.ldN, ldY = l.ldY;
  const int slice = blockIdx.x % l.slices, bh = blockIdx.x / l.slices, b = bh / H, h = bh % H, p0 = slice * PS;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int64_t rhn = int64_t(R) * H * N;
  const int tpc = kRows / R - 1;
  const float* zx_b = a.zx + (int64_t(b) * a.L + a.t0) * a.d_in;  // segment token t's row: zx_b + t·d_in
  const bool qk2 = N % 2 == 0 && aligned_to(a.sg.q, 8) && aligned_to(a.sg.k, 8);

  struct MimoLoad {
    float x, z, o;
  };
  grouped_loop<RMAX == 1 ? 1 : 2>(  // RMAX·PS ≤ 512 items: a thread's items all in flight at once
      RMAX * PS,
      [&](int e) {
        const int r = e / PS, q = e % PS, p = p0 + q;
        const int64_t src = (int64_t(h) * R + r) * P + p;
        MimoLoad m{1.0f, 1.0f, 1.0f};
        if (a.mimo && r < R && p < P) m = {a.p.mimo_x[src], a.p.mimo_z[src], a.p.mimo_o[src]};
        return m;
      },
      [&](int e, const MimoLoad& m) { mx[e] = m.x, mz[e] = m.z, mo[e] = m.o; });
  // The carried state: float4 loads where N keeps its rows 16-byte aligned (the usual case), else by element.
  const float* ssm_in = a.st.ssm + int64_t(bh) * P * N;
  const bool state4 = N % 4 == 0 && aligned_to(a.st.ssm, 16);
  if (state4) {
    struct HLoad {
      int dst;
      float4 v;
    };
    const int n4 = Np / 4;
    grouped_loop<4>(
        PS * n4,
        [&](int e) {
          const int q = e / n4, n = 4 * (e % n4), p = p0 + q;
          HLoad v{q * ldN + n, make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
          if (p < P && n < N) v.v = *reinterpret_cast<const float4*>(ssm_in + int64_t(p) * N + n);
          return v;
        },
        [&](int, const HLoad& v) { *reinterpret_cast<float4*>(Hs + v.dst) = v.v; });
  } else {
    struct HLoad {
      int dst;
      float v;
    };
    grouped_loop<4>(
        PS * Np,
        [&](int e) {
          const int q = e / Np, n = e % Np, p = p0 + q;
          return HLoad{q * ldN + n, p < P && n < N ? ssm_in[int64_t(p) * N + n] : 0.0f};
        },
        [&](int, const HLoad& v) { Hs[v.dst] = v.v; });
  }
  const float Dh = a.p.D[h];

  for (int c0 = 0; c0 < a.Lc; c0 += tpc) {
    const int Tc = min(tpc, a.Lc - c0), rows = (Tc + 1) * R, mt = (rows + 15) / 16;
    __syncthreads();  // the previous chunk's output stage has read Y (over Q, K); the first: mimo, H loaded

    // 1a. Per-token scalars of the chunk: local token i ≥ 1 is segment token c0 + i − 1.
    if (warp == 0) {
      const float4* sc = reinterpret_cast<const float4*>(a.sg.scal);
      float adt[2], gm[2], bt[2];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int i = 1 + lane + 32 * m;
        adt[m] = gm[m] = bt[m] = 0.0f;
        if (i <= Tc) {
          const float4 v = sc[(int64_t(b) * a.Lc + c0 + i - 1) * H + h];  // (α, β, γ, A·Δ)
          bt[m] = v.y;
          gm[m] = v.z;
          adt[m] = v.w;
        }
      }
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float u0 = __shfl_up_sync(0xffffffffu, adt[0], o), u1 = __shfl_up_sync(0xffffffffu, adt[1], o);
        if (lane >= o) adt[0] += u0, adt[1] += u1;
      }
      adt[1] += __shfl_sync(0xffffffffu, adt[0], 31);
#pragma unroll
      for (int m = 0; m < 2; ++m) {  // entries past Tc: Λ stays Λ_Tc, g = β = 0 (β_{Tc+1} = 0 in particular)
        lam[1 + lane + 32 * m] = adt[m];
        gam[1 + lane + 32 * m] = gm[m];
        bet[1 + lane + 32 * m] = bt[m];
      }
      if (lane == 0) lam[0] = gam[0] = bet[0] = 0.0f;
      __syncwarp();
      const float last = lam[Tc];
      for (int i = lane; i <= Tc; i += 32)
        wst[i] = i < Tc ? __expf(last - lam[i]) * gam[i] + __expf(last - lam[i + 1]) * bet[i + 1] : gam[Tc];
    }
    __syncthreads();

    // 1b. Q, K, Kwt (rows j < 16·mt; rows past the chunk are zero). Consecutive threads take consecutive n pairs,
    // as one float2 each where N is even and q, k are 8-byte aligned (every offset is then even).
    const int np2 = Np / 2;
    struct QKLoad {
      int j, n;
      float q0, q1, k0, k1, w;
    };
    grouped_loop<4>(
        mt * 16 * np2,
        [&](int e) {
          QKLoad v{e / np2, 2 * (e % np2), 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
          const int j = v.j, n = v.n, i = j / R, r = j % R;
          if (j < rows) {
            const int64_t within = (int64_t(r) * H + h) * N + n;
            const float* ks = a.sg.k + (int64_t(b) * (a.Lc + 1) + c0 + i) * rhn + within;  // slot c0 + i
            load_pair(ks, n, N, qk2, v.k0, v.k1);
            if (i >= 1)  // the previous token's query rows are never output rows
              load_pair(a.sg.q + (int64_t(b) * a.Lc + c0 + i - 1) * rhn + within, n, N, qk2, v.q0, v.q1);
            v.w = wst[i];
          }
          return v;
        },
        [&](int, const QKLoad& v) {
          const int j = v.j, n = v.n;
          *reinterpret_cast<uint32_t*>(Qs + j * ldN + n) = pack_bf16(v.q0, v.q1);
          *reinterpret_cast<uint32_t*>(Ks + j * ldN + n) = pack_bf16(v.k0, v.k1);
          Kwt[n * kLdRows + j] = __float2bfloat16(v.w * v.k0);
          Kwt[(n + 1) * kLdRows + j] = __float2bfloat16(v.w * v.k1);
        });
    // Vt: v_{j}[p] = mimo_x[r, p]·x_{token}[p]; the previous token of the segment's first chunk is x_{−1}.
    struct VLoad {
      int j, q, r;
      float x;
    };
    grouped_loop<4>(
        mt * 16 * PS,
        [&](int e) {
          VLoad v{e / PS, e % PS, 0, 0.0f};
          const int i = v.j / R, p = p0 + v.q;
          v.r = v.j % R;
          if (v.j < rows && p < P) {
            const int t = c0 + i - 1;  // segment token
            v.x = t < 0 ? a.st.v[int64_t(bh) * P + p] : zx_b[int64_t(t) * a.d_in + a.off_x + h * P + p];
          }
          return v;
        },
        [&](int, const VLoad& v) {
          const float x = v.j < rows && p0 + v.q < P ? mx[v.r * PS + v.q] * v.x : 0.0f;
          Vt[v.q * kLdRows + v.j] = __float2bfloat16(x);
        });
    __syncthreads();

    // 2. W = (Q·Kᵀ) ⊙ c over the n8 tiles (it, jt < 2·row_tiles_reached(it)), it < mt: all that step 3 reads.
    int wtiles = 0;
    for (int it = 0; it < mt; ++it) wtiles += 2 * row_tiles_reached(it, R, mt);
    for (int tile = warp; tile < wtiles; tile += kWarps) {
      int it = 0, jt = tile;
      while (jt >= 2 * row_tiles_reached(it, R, mt)) jt -= 2 * row_tiles_reached(it, R, mt), ++it;
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int k0 = 0; k0 < Np; k0 += 16) {
        uint32_t af[4], b0, b1;
        load_a(af, Qs, ldN, it * 16, k0, g, tq);
        load_b(b0, b1, Ks, ldN, jt * 8, k0, g, tq);
        mma_bf16(d, af, b0, b1);
      }
      const int i0 = it * 16 + g, j0 = jt * 8 + 2 * tq;
      d[0] *= chunk_coef(i0, j0, rows, R, lam, gam, bet);
      d[1] *= chunk_coef(i0, j0 + 1, rows, R, lam, gam, bet);
      d[2] *= chunk_coef(i0 + 8, j0, rows, R, lam, gam, bet);
      d[3] *= chunk_coef(i0 + 8, j0 + 1, rows, R, lam, gam, bet);
      *reinterpret_cast<uint32_t*>(Ws + i0 * kLdRows + j0) = pack_bf16(d[0], d[1]);
      *reinterpret_cast<uint32_t*>(Ws + (i0 + 8) * kLdRows + j0) = pack_bf16(d[2], d[3]);
    }
    __syncthreads();

    // 3. Y rows [16it, +16) × channels [pb, pb + PS/2) of this warp.
    const int it = warp & 3, pb = (warp >> 2) * (PS / 2), nth = PS / 16;
    float acc[kMaxNTiles][4];
#pragma unroll
    for (int t = 0; t < kMaxNTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    if (it < mt) {
      for (int k0 = 0; k0 < Np; k0 += 16) {
        uint32_t af[4];
        load_a(af, Qs, ldN, it * 16, k0, g, tq);
#pragma unroll
        for (int t = 0; t < kMaxNTiles; ++t) {
          if (t < nth) {
            const float* hp = Hs + (pb + t * 8 + g) * ldN + k0 + 2 * tq;
            const float2 h0 = *reinterpret_cast<const float2*>(hp), h1 = *reinterpret_cast<const float2*>(hp + 8);
            mma_bf16(acc[t], af, pack_bf16(h0.x, h0.y), pack_bf16(h1.x, h1.y));
          }
        }
      }
      const int i0 = it * 16 + g, i1 = i0 + 8;
      const float f0 = i0 < rows && i0 >= R ? __expf(lam[i0 / R]) : 0.0f;
      const float f1 = i1 < rows && i1 >= R ? __expf(lam[i1 / R]) : 0.0f;
#pragma unroll
      for (int t = 0; t < kMaxNTiles; ++t) acc[t][0] *= f0, acc[t][1] *= f0, acc[t][2] *= f1, acc[t][3] *= f1;
      for (int ks = 0, kend = row_tiles_reached(it, R, mt); ks < kend; ++ks) {
        uint32_t af[4];
        load_a(af, Ws, kLdRows, it * 16, ks * 16, g, tq);
#pragma unroll
        for (int t = 0; t < kMaxNTiles; ++t) {
          if (t < nth) {
            uint32_t b0, b1;
            load_b(b0, b1, Vt, kLdRows, pb + t * 8, ks * 16, g, tq);
            mma_bf16(acc[t], af, b0, b1);
          }
        }
      }
    }
    __syncthreads();  // every warp has read Q, K, W and the old H

    if (it < mt) {
      const int i0 = it * 16 + g;
#pragma unroll
      for (int t = 0; t < kMaxNTiles; ++t) {
        if (t < nth) {
          float* y = Ys + i0 * ldY + pb + t * 8 + 2 * tq;
          *reinterpret_cast<float2*>(y) = make_float2(acc[t][0], acc[t][1]);
          *reinterpret_cast<float2*>(y + 8 * ldY) = make_float2(acc[t][2], acc[t][3]);
        }
      }
    }
    // 4. H ← e^{Λ_Tc}·H + Vt·Kwtᵀ: items of 16 channels × 16 state columns (two n8 tiles).
    {
      const float decay = __expf(lam[Tc]);
      const int nps = Np / 16;
      for (int item = warp; item < (PS / 16) * nps; item += kWarps) {
        const int pt = item / nps, nq = item % nps;
        float* h00 = Hs + (pt * 16 + g) * ldN + nq * 16 + 2 * tq;
        float d0[4], d1[4];
        float2 v = *reinterpret_cast<const float2*>(h00);
        d0[0] = decay * v.x, d0[1] = decay * v.y;
        v = *reinterpret_cast<const float2*>(h00 + 8 * ldN);
        d0[2] = decay * v.x, d0[3] = decay * v.y;
        v = *reinterpret_cast<const float2*>(h00 + 8);
        d1[0] = decay * v.x, d1[1] = decay * v.y;
        v = *reinterpret_cast<const float2*>(h00 + 8 * ldN + 8);
        d1[2] = decay * v.x, d1[3] = decay * v.y;
        for (int ks = 0; ks < mt; ++ks) {
          uint32_t af[4], b0, b1;
          load_a(af, Vt, kLdRows, pt * 16, ks * 16, g, tq);
          load_b(b0, b1, Kwt, kLdRows, nq * 16, ks * 16, g, tq);
          mma_bf16(d0, af, b0, b1);
          load_b(b0, b1, Kwt, kLdRows, nq * 16 + 8, ks * 16, g, tq);
          mma_bf16(d1, af, b0, b1);
        }
        *reinterpret_cast<float2*>(h00) = make_float2(d0[0], d0[1]);
        *reinterpret_cast<float2*>(h00 + 8 * ldN) = make_float2(d0[2], d0[3]);
        *reinterpret_cast<float2*>(h00 + 8) = make_float2(d1[0], d1[1]);
        *reinterpret_cast<float2*>(h00 + 8 * ldN + 8) = make_float2(d1[2], d1[3]);
      }
    }
    __syncthreads();

    // 5. Output stage, a warp per new token; lane owns channels q = lane + 32k of the slice. The warp's next token's
    // x, z are loaded before this token's math and o stores (which the loads could not pass: a full wait on global
    // latency per token); two tokens ahead cost the R = 4 kernel ~40 registers. The norm weights once per chunk.
    float nw[4], xn[4], zn[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int q = lane + 32 * k, p = p0 + q;
      nw[k] = a.p.norm && q < PS && p < P ? a.p.norm[h * P + p] : 0.0f;
    }
    const auto load_xz = [&](int i) {
      const float* row = zx_b + int64_t(c0 + min(i, Tc) - 1) * a.d_in;  // past Tc: loaded, unused
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int q = lane + 32 * k, p = p0 + q;
        const bool valid = q < PS && p < P;
        xn[k] = valid ? row[a.off_x + h * P + p] : 0.0f;
        zn[k] = valid ? row[h * P + p] : 0.0f;
      }
    };
    load_xz(1 + warp);
#pragma unroll 1
    for (int i = 1 + warp; i <= Tc; i += kWarps) {
      const int t = c0 + i - 1;
      float x[4], z[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) x[k] = xn[k], z[k] = zn[k];
      load_xz(i + kWarps);
      float y[RMAX][4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int q = lane + 32 * k, p = p0 + q;
        const bool valid = q < PS && p < P;
#pragma unroll
        for (int r = 0; r < RMAX; ++r)
          y[r][k] = valid && r < R ? Ys[(i * R + r) * ldY + q] + Dh * mx[r * PS + q] * x[k] : 0.0f;
      }
      if (a.p.norm) {  // one block holds the whole head (slices = 1)
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
          if (r < R) {
            const float ss = warp_sum(y[r][0] * y[r][0] + y[r][1] * y[r][1] + y[r][2] * y[r][2] + y[r][3] * y[r][3]);
            const float rstd = rsqrtf(ss / float(P) + kMamba3NormEps);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const int p = p0 + lane + 32 * k;
              if (lane + 32 * k < PS && p < P) y[r][k] *= rstd * nw[k];
            }
          }
        }
      }
      const int64_t o_base = (int64_t(b) * a.L + a.t0 + t) * a.d_inner + int64_t(h) * P;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int q = lane + 32 * k, p = p0 + q;
        if (q >= PS || p >= P) continue;
        float out = 0.0f;
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
          if (r < R) {
            if (a.mimo) {
              const float zz = mz[r * PS + q] * z[k];
              out += mo[r * PS + q] * y[r][k] * (zz * sigmoid_f(zz));
            } else {
              out = y[r][k] * (z[k] * sigmoid_f(z[k]));
            }
          }
        }
        if (a.o_bf16)
          static_cast<__nv_bfloat16*>(a.o)[o_base + p] = __float2bfloat16(out);
        else
          static_cast<float*>(a.o)[o_base + p] = out;
      }
    }
  }

  // Final state of the slice (the last chunk's step 4 is behind its barrier) and the last token's x as the v state;
  // x_{−1} of these channels was read by this block's first chunk only.
  float* ssm_out = a.st.ssm + int64_t(bh) * P * N;
  if (state4) {  // a quarter of the store instructions
    const int n4 = N / 4;
    for (int e = tid; e < PS * n4; e += kThreads) {
      const int q = e / n4, n = 4 * (e % n4), p = p0 + q;
      if (p < P)
        *reinterpret_cast<float4*>(ssm_out + int64_t(p) * N + n) = *reinterpret_cast<const float4*>(Hs + q * ldN + n);
    }
  } else {
    for (int e = tid; e < PS * N; e += kThreads) {
      const int q = e / N, n = e % N, p = p0 + q;
      if (p < P) ssm_out[int64_t(p) * N + n] = Hs[q * ldN + n];
    }
  }
  const float* xlast = zx_b + int64_t(a.Lc - 1) * a.d_in + a.off_x + h * P;
  for (int q = tid; q < PS; q += kThreads)
    if (p0 + q < P) a.st.v[int64_t(bh) * P + p0 + q] = xlast[p0 + q];
}

int max_shared_optin() {
  int dev = 0, bytes = 0;
  MAMBA3_CUDA_CHECK(cudaGetDevice(&dev));
  MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

template <int RMAX>
void launch_chunk(cudaStream_t s, const Mamba3ChunkArgs& a, const ChunkLayout& l, int64_t blocks, int limit) {
  static bool raised = false;  // the dynamic shared-memory limit (48 KB by default), raised once per instantiation
  if (!raised) {
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(mamba3_chunk_kernel<RMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           limit));
    raised = true;
  }
  mamba3_chunk_kernel<RMAX><<<unsigned(blocks), kThreads, l.total, s>>>(a, l);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace

size_t mamba3_chunk_gpu_shared_bytes(int N, int P, int R, bool outnorm) {
  return chunk_layout(N, P, R, outnorm).total;
}

bool mamba3_chunk_gpu(cudaStream_t s, const Mamba3ChunkArgs& a, int64_t batch) {
  static const int limit = max_shared_optin();
  const ChunkLayout l = chunk_layout(a.N, a.P, a.R, a.p.norm != nullptr);
  if (a.R > 4 || a.N > 256 || a.P > 128 || l.total > size_t(limit) || a.Lc < 1) return false;
  const int64_t blocks = batch * a.H * l.slices;
  MAMBA3_CHECK(blocks < (int64_t(1) << 31), "Mamba-3 CUDA chunked prefill: {} blocks", blocks);
  if (a.R == 1)
    launch_chunk<1>(s, a, l, blocks, limit);
  else
    launch_chunk<4>(s, a, l, blocks, limit);
  return true;
}

}  // namespace mamba3::cuda
