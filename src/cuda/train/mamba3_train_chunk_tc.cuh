#pragma once
// Tensor-core versions of the training chunk kernels' large products (mamba3_train_chunk.cu), used in the bf16
// mixed-precision mode when the chunk path is "tc" (MAMBA3_TRAIN_CHUNK=tc or Mamba3TrainGpu::set_chunk_tensor_cores).
// Each product runs as 16×8 output tiles of mma.sync m16n8k16 (bf16 operands rounded to nearest even from the f32
// shared-memory tiles while the fragments are formed, f32 accumulation); the tiles keep the f32 kernel's layout, so
// shared memory and the chunk length are unchanged, and every epilogue applies the f32 kernel's per-element formula to
// the accumulators. The carried states (H in the forward, dH in the reverse) stay f32: the mma accumulates onto them
// in f32. A tile is owned by one warp, which walks k in a fixed order: deterministic, no atomics.
//
// Operands are read through accessors a(m, k) / b(k, n) that return 0 outside the chunk's rows, N or P, so partial
// chunks, N and P not multiples of 16 and the (token, rank) rows of MIMO need no special cases; products whose k axis
// is the chunk's rows start/stop at the causal bounds rounded out to 16 (the stored W, dW, Sm are 0 above the token
// diagonal, so the extra terms are exact zeros).
//
// Fragment layouts (PTX ISA, mma.m16n8k16, lane = 4·g + tq): A (row-major 16×16) registers hold (g, 2tq..+1),
// (g+8, 2tq..+1), (g, 2tq+8..+9), (g+8, 2tq+8..+9); B (16×8, "col") (2tq..+1, g), (2tq+8..+9, g); C/D (g, 2tq..+1),
// (g+8, 2tq..+1). Low half of a register = lower k.
//
// Checked by a host emulation that compiles this header with MAMBA3_TC_HOST_EMULATION (pack_bf16 and a warp-
// collective mma_bf16 supplied by the emulator, one host thread per lane) against the f32 kernel's products.
#include <cstdint>

#ifndef MAMBA3_TC_HOST_EMULATION
#include <cuda_bf16.h>
#endif

namespace mamba3::cuda::train_detail::tc {

constexpr int kWarps = 8;  // warps of a chunk block (kChunkThreads / 32; checked where this header is used)

#ifndef MAMBA3_TC_HOST_EMULATION
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a·b for one m16n8k16 tile, bf16 operands, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// acc += Σ_{k ∈ [k0, k1)} a(m, k)·b(k, n) on the 16×8 tile at (m0, n0); k steps by 16 (past k1 up to the next multiple
// of 16 the accessors must return 0 or the caller must know the terms vanish).
template <class FA, class FB>
__device__ __forceinline__ void mma_tile(float (&acc)[4], const FA& a, const FB& b, int m0, int n0, int k0, int k1,
                                         int g, int tq) {
  const int m = m0 + g, n = n0 + g;
  for (int k = k0 + 2 * tq; k - 2 * tq < k1; k += 16) {
    const uint32_t af[4] = {pack_bf16(a(m, k), a(m, k + 1)), pack_bf16(a(m + 8, k), a(m + 8, k + 1)),
                            pack_bf16(a(m, k + 8), a(m, k + 9)), pack_bf16(a(m + 8, k + 8), a(m + 8, k + 9))};
    mma_bf16(acc, af, pack_bf16(b(k, n), b(k + 1, n)), pack_bf16(b(k + 8, n), b(k + 9, n)));
  }
}

// Row and column of accumulator e (0..3) of a lane's 16×8 tile.
__device__ __forceinline__ int acc_row(int m0, int g, int e) { return m0 + g + (e >> 1) * 8; }
__device__ __forceinline__ int acc_col(int n0, int tq, int e) { return n0 + 2 * tq + (e & 1); }

// The P×N state tile at (m0, n0): S ← scale·S + Σ_{k < k1} a(·, k)·b(k, ·), the scaled f32 state being the
// accumulator's start (the forward's H update and the reverse's dH update).
template <class FA, class FB>
__device__ __forceinline__ void decay_accumulate_tile(float* S, int ldN, int P, int N, float scale, const FA& a,
                                                      const FB& b, int m0, int n0, int k1, int g, int tq) {
  float acc[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int q = acc_row(m0, g, e), n = acc_col(n0, tq, e);
    acc[e] = q < P && n < N ? scale * S[q * ldN + n] : 0.0f;
  }
  mma_tile(acc, a, b, m0, n0, 0, k1, g, tq);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int q = acc_row(m0, g, e), n = acc_col(n0, tq, e);
    if (q < P && n < N) S[q * ldN + n] = acc[e];
  }
}

// Causal k bounds over the chunk's rows for the output row tile [m0, m0 + 16): rows of earlier-or-equal tokens end at
// causal_end (exclusive); rows of later-or-equal tokens start at causal_begin (rounded down to 16).
__device__ __forceinline__ int causal_end(int m0, int rows, int R) {
  return imin(rows, (imin(m0 + 15, rows - 1) / R + 1) * R);
}
__device__ __forceinline__ int causal_begin(int m0, int R) { return (m0 / R) * R / 16 * 16; }

// The f32 shared-memory tiles and per-token scalars of one chunk, as both chunk kernels lay them out (row strides
// ldN, ldP, ldR; rows = Tc·R (token, rank) rows, row j is token j / R).
struct Tiles {
  int rows, R, N, P, ldN, ldP, ldR;
  const float *Q, *K, *V;            // (rows, N) ×2, (rows, P)
  const float *Lam, *scale, *gam;    // (Tc) Λ, scale, γ
  const float* eL;                   // (Tc) e^Λ
  float Dh;                          // D of the head
};

// ---- Forward (chunk_forward_kernel) --------------------------------------------------------------------------------

// Interval 1 of a forward chunk: W = (q·kᵀ) ⊙ coef → sW (rows², zeros above the token diagonal) and
// y = e^Λ·(q·Hᵀ) + D·v → sY (rows × P). Tiles: ⌈rows/16⌉·⌈rows/8⌉ score tiles (k = N; those wholly above the diagonal
// only write zeros) then ⌈rows/16⌉·⌈P/8⌉ y tiles (k = N), dealt round-robin to the 8 warps. mma count per chunk
// (rows 64, N 128, P 64): (20 causal score tiles + 32 y tiles)·N/16 = 416, i.e. 416·4096 FLOP = 1.7 MFLOP.
__device__ __forceinline__ void fwd_scores_y(const Tiles& t, const float* sH, float* sW, float* sY, int warp,
                                             int lane) {
  const int g = lane >> 2, tq = lane & 3, rows = t.rows, R = t.R, N = t.N, P = t.P;
  const int ldN = t.ldN, ldP = t.ldP, ldR = t.ldR;
  const float *Q = t.Q, *K = t.K;
  const auto qa = [=](int m, int k) { return m < rows && k < N ? Q[m * ldN + k] : 0.0f; };
  const auto kb = [=](int k, int n) { return n < rows && k < N ? K[n * ldN + k] : 0.0f; };
  const auto hb = [=](int k, int n) { return n < P && k < N ? sH[n * ldN + k] : 0.0f; };
  const int mt = (rows + 15) / 16, wt = (rows + 7) / 8, yt = (P + 7) / 8;
  for (int tile = warp; tile < mt * (wt + yt); tile += kWarps) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (tile < mt * wt) {
      const int m0 = tile / wt * 16, n0 = tile % wt * 8;
      if (n0 / R <= imin(m0 + 15, rows - 1) / R) mma_tile(acc, qa, kb, m0, n0, 0, N, g, tq);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = acc_row(m0, g, e), jj = acc_col(n0, tq, e);
        if (j >= rows || jj >= rows) continue;
        const int tl = j / R, sl = jj / R;
        sW[j * ldR + jj] =
            sl <= tl ? acc[e] * (sl < tl ? expf(t.Lam[tl] - t.Lam[sl]) * t.scale[sl] : t.gam[tl]) : 0.0f;
      }
    } else {
      const int y = tile - mt * wt, m0 = y / yt * 16, n0 = y % yt * 8;
      mma_tile(acc, qa, hb, m0, n0, 0, N, g, tq);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = acc_row(m0, g, e), q = acc_col(n0, tq, e);
        if (j < rows && q < P) sY[j * ldP + q] = t.eL[j / R] * acc[e] + t.Dh * t.V[j * ldP + q];
      }
    }
  }
}

// Interval 2 of a forward chunk: y += W·v (k = the chunk's rows up to the tile's causal end) and the state to the
// chunk's end H ← e^{Λ_last}·H + (w ⊙ v)ᵀ·k (k = rows; the f32 state is the accumulator's start, scaled first).
// Tiles: ⌈rows/16⌉·⌈P/8⌉ then ⌈P/16⌉·⌈N/8⌉. mma count (rows 64, N 128, P 64): 80 + 256 = 336 (1.4 MFLOP).
// with_state false (the chunk-parallel schedule, whose states come from a scan): y += W·v only.
__device__ __forceinline__ void fwd_wv_state(const Tiles& t, const float* sW, const float* wv, float elast, float* sH,
                                             float* sY, int warp, int lane, bool with_state = true) {
  const int g = lane >> 2, tq = lane & 3, rows = t.rows, R = t.R, N = t.N, P = t.P;
  const int ldN = t.ldN, ldP = t.ldP, ldR = t.ldR;
  const float *K = t.K, *V = t.V;
  const auto wa = [=](int m, int k) { return m < rows && k < rows ? sW[m * ldR + k] : 0.0f; };
  const auto vb = [=](int k, int n) { return k < rows && n < P ? V[k * ldP + n] : 0.0f; };
  const auto wva = [=](int m, int k) { return m < P && k < rows ? wv[k / R] * V[k * ldP + m] : 0.0f; };
  const auto kb = [=](int k, int n) { return k < rows && n < N ? K[k * ldN + n] : 0.0f; };
  const int mt = (rows + 15) / 16, yt = (P + 7) / 8, pm = (P + 15) / 16, nt = (N + 7) / 8;
  const int tiles = mt * yt + (with_state ? pm * nt : 0);
  for (int tile = warp; tile < tiles; tile += kWarps) {
    if (tile < mt * yt) {
      const int m0 = tile / yt * 16, n0 = tile % yt * 8;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      mma_tile(acc, wa, vb, m0, n0, 0, causal_end(m0, rows, R), g, tq);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = acc_row(m0, g, e), q = acc_col(n0, tq, e);
        if (j < rows && q < P) sY[j * ldP + q] += acc[e];
      }
    } else {
      const int s = tile - mt * yt, m0 = s / nt * 16, n0 = s % nt * 8;
      decay_accumulate_tile(sH, ldN, P, N, elast, wva, kb, m0, n0, rows, g, tq);
    }
  }
}

// A chunk's state-shaped product from a zero start (the chunk-parallel schedule): out (P × N, row stride ldo; global
// memory allowed) = Σ_{rows j} s[j / R]·X[j, q]·Y[j, n], X (rows, P) row stride ldX, Y (rows, N) row stride ldY:
// the forward's state change (w ⊙ v)ᵀ·k and the backward's dH contribution (e^Λ ⊙ dy)ᵀ·q. Tiles ⌈P/16⌉·⌈N/8⌉
// (k = rows). mma count (rows 64, N 128, P 64): 256 (1.0 MFLOP).
__device__ __forceinline__ void state_outer(int rows, int R, int P, int N, const float* X, int ldX, const float* s,
                                            const float* Y, int ldY, float* out, int ldo, int warp, int lane) {
  const int g = lane >> 2, tq = lane & 3;
  const auto xa = [=](int m, int k) { return m < P && k < rows ? s[k / R] * X[k * ldX + m] : 0.0f; };
  const auto yb = [=](int k, int n) { return k < rows && n < N ? Y[k * ldY + n] : 0.0f; };
  const int pm = (P + 15) / 16, nt = (N + 7) / 8;
  for (int tile = warp; tile < pm * nt; tile += kWarps) {
    const int m0 = tile / nt * 16, n0 = tile % nt * 8;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_tile(acc, xa, yb, m0, n0, 0, rows, g, tq);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int q = acc_row(m0, g, e), n = acc_col(n0, tq, e);
      if (q < P && n < N) out[int64_t(q) * ldo + n] = acc[e];
    }
  }
}

// ---- Reverse (chunk_reverse_kernel) --------------------------------------------------------------------------------

// The reverse kernel's tiles besides Tiles: inputs dy and the chunk-start state, the carried dH and the outputs.
struct RevTiles {
  const float *dY, *Hc;        // (rows, P), (P, N)
  float* dH;                   // (P, N) carried
  float *Sm, *dW, *E;          // (rows, rows)
  float *dV, *T1, *T2;         // (rows, P)
  float *dQ, *dK;              // (rows, N)
  const float* e2;             // (Tc) e^{Λ_last − Λ}
};

// Interval 1: S = q·kᵀ (k = N) and dW = dy·vᵀ (k = P) on the same tile; Sm ← S ⊙ coef, dW ← dW ⊙ coef,
// E = d loss/d coef without scale (the f32 kernel's epilogue). Tiles ⌈rows/16⌉·⌈rows/8⌉, those wholly above the
// diagonal only write zeros. mma count (rows 64, N 128, P 64): 20 causal tiles × (8 + 4) = 240 (1.0 MFLOP).
__device__ __forceinline__ void rev_scores(const Tiles& t, const RevTiles& r, int warp, int lane) {
  const int g = lane >> 2, tq = lane & 3, rows = t.rows, R = t.R, N = t.N, P = t.P;
  const int ldN = t.ldN, ldP = t.ldP, ldR = t.ldR;
  const float *Q = t.Q, *K = t.K, *V = t.V, *dY = r.dY;
  const auto qa = [=](int m, int k) { return m < rows && k < N ? Q[m * ldN + k] : 0.0f; };
  const auto kb = [=](int k, int n) { return n < rows && k < N ? K[n * ldN + k] : 0.0f; };
  const auto dya = [=](int m, int k) { return m < rows && k < P ? dY[m * ldP + k] : 0.0f; };
  const auto vb = [=](int k, int n) { return n < rows && k < P ? V[n * ldP + k] : 0.0f; };
  const int mt = (rows + 15) / 16, wt = (rows + 7) / 8;
  for (int tile = warp; tile < mt * wt; tile += kWarps) {
    const int m0 = tile / wt * 16, n0 = tile % wt * 8;
    float as[4] = {0.0f, 0.0f, 0.0f, 0.0f}, adw[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (n0 / R <= imin(m0 + 15, rows - 1) / R) {
      mma_tile(as, qa, kb, m0, n0, 0, N, g, tq);
      mma_tile(adw, dya, vb, m0, n0, 0, P, g, tq);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = acc_row(m0, g, e), jj = acc_col(n0, tq, e);
      if (j >= rows || jj >= rows) continue;
      const int tl = j / R, sl = jj / R;
      float s = 0.0f, dw = 0.0f, cf = 0.0f, ge = 0.0f;
      if (sl <= tl) {
        s = as[e], dw = adw[e];
        if (sl < tl) {
          const float ex = expf(t.Lam[tl] - t.Lam[sl]);
          cf = ex * t.scale[sl];
          ge = dw * s * ex;
        } else {
          cf = t.gam[tl];
          ge = dw * s;
        }
      }
      r.Sm[j * ldR + jj] = s * cf;
      r.dW[j * ldR + jj] = dw * cf;
      r.E[j * ldR + jj] = ge;
    }
  }
}

// Interval 2: per (rows × P) tile dV = Smᵀ·dy (k = rows from the tile's causal begin) + D·dy + w ⊙ T2, T1 = q·H_cᵀ,
// T2 = k·dHᵀ (k = N); then per (rows × N) tile dQ = dW·k (k up to the causal end) + e^Λ ⊙ (dy·H_c) (k = P) and
// dK = dWᵀ·q (from the causal begin) + w ⊙ (v·dH) (k = P). Tiles ⌈rows/16⌉·(⌈P/8⌉ + ⌈N/8⌉). mma count (rows 64,
// N 128, P 64): 32 × (≈2.5 + 16) + 64 × (≈2.5 + 4 + ≈2.5 + 4) ≈ 1420 (5.8 MFLOP).
__device__ __forceinline__ void rev_dv_dq_dk(const Tiles& t, const RevTiles& r, int warp, int lane) {
  const int g = lane >> 2, tq = lane & 3, rows = t.rows, R = t.R, N = t.N, P = t.P;
  const int ldN = t.ldN, ldP = t.ldP, ldR = t.ldR;
  const float *Q = t.Q, *K = t.K, *V = t.V, *dY = r.dY, *Hc = r.Hc, *dH = r.dH, *Sm = r.Sm, *dW = r.dW;
  // Row-major operands (m, k) and (k, n) over the chunk's rows, N and P.
  const auto smt = [=](int m, int k) { return m < rows && k < rows ? Sm[k * ldR + m] : 0.0f; };
  const auto dwa = [=](int m, int k) { return m < rows && k < rows ? dW[m * ldR + k] : 0.0f; };
  const auto dwt = [=](int m, int k) { return m < rows && k < rows ? dW[k * ldR + m] : 0.0f; };
  const auto qa = [=](int m, int k) { return m < rows && k < N ? Q[m * ldN + k] : 0.0f; };
  const auto ka = [=](int m, int k) { return m < rows && k < N ? K[m * ldN + k] : 0.0f; };
  const auto dya = [=](int m, int k) { return m < rows && k < P ? dY[m * ldP + k] : 0.0f; };
  const auto va = [=](int m, int k) { return m < rows && k < P ? V[m * ldP + k] : 0.0f; };
  const auto dyb = [=](int k, int n) { return k < rows && n < P ? dY[k * ldP + n] : 0.0f; };
  const auto qb = [=](int k, int n) { return k < rows && n < N ? Q[k * ldN + n] : 0.0f; };
  const auto kb = [=](int k, int n) { return k < rows && n < N ? K[k * ldN + n] : 0.0f; };
  const auto hct = [=](int k, int n) { return n < P && k < N ? Hc[n * ldN + k] : 0.0f; };    // H_cᵀ: (N, P)
  const auto dht = [=](int k, int n) { return n < P && k < N ? dH[n * ldN + k] : 0.0f; };    // dHᵀ: (N, P)
  const auto hcb = [=](int k, int n) { return k < P && n < N ? Hc[k * ldN + n] : 0.0f; };    // H_c: (P, N)
  const auto dhb = [=](int k, int n) { return k < P && n < N ? dH[k * ldN + n] : 0.0f; };    // dH: (P, N)
  const int mt = (rows + 15) / 16, pt = (P + 7) / 8, nt = (N + 7) / 8;
  for (int tile = warp; tile < mt * (pt + nt); tile += kWarps) {
    if (tile < mt * pt) {
      const int m0 = tile / pt * 16, n0 = tile % pt * 8;
      float dv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, t1[4] = {0.0f, 0.0f, 0.0f, 0.0f}, t2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      mma_tile(dv, smt, dyb, m0, n0, causal_begin(m0, R), rows, g, tq);
      mma_tile(t1, qa, hct, m0, n0, 0, N, g, tq);
      mma_tile(t2, ka, dht, m0, n0, 0, N, g, tq);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = acc_row(m0, g, e), q = acc_col(n0, tq, e), tl = j / R;
        if (j >= rows || q >= P) continue;
        r.T1[j * ldP + q] = t1[e];
        r.T2[j * ldP + q] = t2[e];
        r.dV[j * ldP + q] = dv[e] + t.Dh * dY[j * ldP + q] + r.e2[tl] * t.scale[tl] * t2[e];
      }
    } else {
      const int s = tile - mt * pt, m0 = s / nt * 16, n0 = s % nt * 8;
      float aq[4] = {0.0f, 0.0f, 0.0f, 0.0f}, bq[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float ak[4] = {0.0f, 0.0f, 0.0f, 0.0f}, bk[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      mma_tile(aq, dwa, kb, m0, n0, 0, causal_end(m0, rows, R), g, tq);
      mma_tile(bq, dya, hcb, m0, n0, 0, P, g, tq);
      mma_tile(ak, dwt, qb, m0, n0, causal_begin(m0, R), rows, g, tq);
      mma_tile(bk, va, dhb, m0, n0, 0, P, g, tq);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = acc_row(m0, g, e), n = acc_col(n0, tq, e), tl = j / R;
        if (j >= rows || n >= N) continue;
        r.dQ[j * ldN + n] = aq[e] + t.eL[tl] * bq[e];
        r.dK[j * ldN + n] = ak[e] + r.e2[tl] * t.scale[tl] * bk[e];
      }
    }
  }
}

// Interval 3: dH ← e^{Λ_last}·dH + (e^Λ ⊙ dy)ᵀ·q (k = rows; the f32 dH, scaled, is the accumulator's start). Tiles
// ⌈P/16⌉·⌈N/8⌉. mma count (rows 64, N 128, P 64): 64 × 4 = 256 (1.0 MFLOP).
__device__ __forceinline__ void rev_dstate(const Tiles& t, const RevTiles& r, float elast, int warp, int lane) {
  const int g = lane >> 2, tq = lane & 3, rows = t.rows, R = t.R, N = t.N, P = t.P;
  const int ldN = t.ldN, ldP = t.ldP;
  const float *Q = t.Q, *dY = r.dY, *eL = t.eL;
  float* dH = r.dH;
  const auto ea = [=](int m, int k) { return m < P && k < rows ? eL[k / R] * dY[k * ldP + m] : 0.0f; };
  const auto qb = [=](int k, int n) { return k < rows && n < N ? Q[k * ldN + n] : 0.0f; };
  const int pm = (P + 15) / 16, nt = (N + 7) / 8;
  for (int tile = warp; tile < pm * nt; tile += kWarps) {
    decay_accumulate_tile(dH, ldN, P, N, elast, ea, qb, tile / nt * 16, tile % nt * 8, rows, g, tq);
  }
}

}  // namespace mamba3::cuda::train_detail::tc
