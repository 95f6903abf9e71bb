#include "ops/mamba3_scan_backward.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "core/parallel.h"
#include "ops/linear.h"
#include "ops/mamba3_scan.h"

namespace mamba3 {

using namespace detail;

namespace {

constexpr float kPiF = float(std::numbers::pi);

// C (m × n) = op(A)·op(B) + beta·C with the rows of C split over the threads (single-threaded BLAS in each).
void gemm_rows(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int64_t threads = std::min<int64_t>(max_threads(), std::max<int64_t>(1, m / 16));
  const int64_t block = (m + threads - 1) / threads;
  parallel_for(threads, [&](int64_t i) {
    const int64_t m0 = i * block, m1 = std::min(m, m0 + block);
    if (m0 >= m1) return;
    const float* a = ta ? A + m0 : A + m0 * lda;  // op(A) rows m0.. are columns of A when transposed
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m1 - m0), int(n),
                int(k), 1.0f, a, int(lda), B, int(ldb), beta, C + m0 * ldc, int(ldc));
  });
}

// Per-token scalars of spec §2.2 with what their backward needs (computed exactly as head_scalars does).
struct ScalarsGrad {
  float dt, A, lam;
  float dA_dlogit;  // dA/d(dd_A): −f_A′, or 0 where the A_floor clamp binds
  float dsp;        // softplus′(dd_dt + dt_bias)
};

ScalarsGrad scalars_grad(const Mamba3Config& c, const float* zx, int64_t h, const float* dt_bias) {
  const int64_t H = c.nheads();
  const float* dd = zx + c.off_dt();
  const float arg = dd[h] + dt_bias[h];
  const float a = dd[H + h];
  float f, df;
  if (c.a_activation == AActivation::HeavyTail) {
    f = a >= 0 ? 1.0f + a : 1.0f / (1.0f - a);
    df = a >= 0 ? 1.0f : 1.0f / ((1.0f - a) * (1.0f - a));
  } else {
    f = softplus(a);
    df = a > 20.0f ? 1.0f : sigmoid(a);
  }
  const bool clamped = -f > -float(c.A_floor);
  return {softplus(arg), std::min(-f, -float(c.A_floor)), c.euler ? 1.0f : sigmoid(dd[2 * H + h]), clamped ? 0.0f : -df,
          arg > 20.0f ? 1.0f : sigmoid(arg)};
}

// Per-(row, head) parameter-gradient partials, reduced over batch rows at the end.
struct HeadGrads {
  std::vector<float> B_bias, C_bias, mimo_x, mimo_z, mimo_o, norm;  // (R, N) ×2, (R, P) ×3, (P)
  float D = 0, dt_bias = 0;
};

// Per-thread buffers for one (row, head) task; sized once per call.
struct BwdScratch {
  std::vector<float> dt, A, lam, dAdl, dsp, scale_all;   // (L)
  std::vector<float> dadt, dgam, dscale, ddt_ang;        // (L)
  std::vector<float> cs, sn;                             // (L, S)
  std::vector<float> dy;                                 // (L, R, P)
  std::vector<float> Hc;                                 // (chunks, P, N)
  std::vector<float> q, k, dq, dk, tn;                   // (C·R, N)
  std::vector<float> v, y, dv, tp, dys;                  // (C·R, P)
  std::vector<float> sm, dw;                             // (C·R, C·R)
  std::vector<float> Lam, dLam, dws;                     // (C)
  std::vector<float> H, dH, dHc;                         // (P, N)
  std::vector<float> phi, dPhi, dphi, dyn, xhat;         // (S), (P)

  void resize(const Mamba3Config& c, int64_t L) {
    const int64_t C = std::min(c.chunk_size, L), R = c.rank(), N = c.d_state, P = c.headdim, S = c.num_angles();
    const int64_t chunks = (L + c.chunk_size - 1) / c.chunk_size;
    for (auto* b : {&dt, &A, &lam, &dAdl, &dsp, &scale_all, &dadt, &dgam, &dscale, &ddt_ang}) b->resize(size_t(L));
    cs.resize(size_t(L * S)), sn.resize(size_t(L * S)), dy.resize(size_t(L * R * P)), Hc.resize(size_t(chunks * P * N));
    for (auto* b : {&q, &k, &dq, &dk, &tn}) b->resize(size_t(C * R * N));
    for (auto* b : {&v, &y, &dv, &tp, &dys}) b->resize(size_t(C * R * P));
    sm.resize(size_t(C * R * C * R)), dw.resize(size_t(C * R * C * R));
    Lam.resize(size_t(C)), dLam.resize(size_t(C)), dws.resize(size_t(C));
    H.resize(size_t(P * N)), dH.resize(size_t(P * N)), dHc.resize(size_t(P * N));
    phi.resize(size_t(S)), dPhi.resize(size_t(S)), dphi.resize(size_t(S)), dyn.resize(size_t(P)), xhat.resize(size_t(P));
  }
};

// Where one task reads and writes (all row-major, this batch row).
struct TaskIO {
  const float* zx;     // (L, d_in) B/C normalised
  const float* dO;     // (L, d_inner) gradient of the gated output
  float* o;            // (L, d_inner) gated output (head h's columns written)
  float* dzx;          // (L, d_in) head h's z, x, dt, A, trap columns written
  float* dBn;          // (L, H, R, N) gradient of the normalised B seen by head h (before the group sum)
  float* dCn;          // (L, H, R, N)
  float* dth;          // (L, H, S)   gradient of θ through head h
  const float* th;     // (L, S) tanh θ, once per token for all heads
  const float *init_angle, *init_ssm, *init_k, *init_v;  // (H, S), (H, P, N), (R, H, N), (H, P); null = zero
  float *d_angle, *d_ssm, *d_k, *d_v;                    // null when not wanted
};

// Output stage (spec §7) and its backward for one token and head: y (R, P), z (P), dO (P) → o (P), dy (R, P),
// dz (P, written); parameter partials accumulated into g.
void output_stage_backward(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t h, const float* y,
                           const float* z, const float* dO, float* o, float* dy, float* dz, HeadGrads& g,
                           BwdScratch& s) {
  const int64_t P = c.headdim, R = c.rank();
  const float* nw = p.norm ? p.norm + h * P : nullptr;
  for (int64_t q = 0; q < P; ++q) o[q] = 0, dz[q] = 0;
  for (int64_t r = 0; r < R; ++r) {
    const float* yr = y + r * P;
    float rstd = 1.0f;
    if (nw) {
      float ss = 0;
      for (int64_t q = 0; q < P; ++q) ss += yr[q] * yr[q];
      rstd = 1.0f / std::sqrt(ss / float(P) + kNormEps);
    }
    for (int64_t q = 0; q < P; ++q) {
      const float xh = yr[q] * rstd;
      s.xhat[size_t(q)] = xh;
      const float yn = nw ? xh * nw[q] : yr[q];
      if (c.is_mimo) {
        const int64_t i = (h * R + r) * P + q;
        const float mz = p.mimo_z[i], mo = p.mimo_o[i], zz = mz * z[q];
        const float sg = sigmoid(zz), si = zz * sg, dsi = sg * (1.0f + zz * (1.0f - sg));
        o[q] += mo * yn * si;
        g.mimo_o[size_t(r * P + q)] += dO[q] * yn * si;
        s.dyn[size_t(q)] = dO[q] * mo * si;
        const float dzz = dO[q] * mo * yn * dsi;
        g.mimo_z[size_t(r * P + q)] += dzz * z[q];
        dz[q] += dzz * mz;
      } else {
        const float sg = sigmoid(z[q]), si = z[q] * sg, dsi = sg * (1.0f + z[q] * (1.0f - sg));
        o[q] = yn * si;
        s.dyn[size_t(q)] = dO[q] * si;
        dz[q] += dO[q] * yn * dsi;
      }
    }
    float* dyr = dy + r * P;
    if (nw) {
      float mean = 0;
      for (int64_t q = 0; q < P; ++q) {
        g.norm[size_t(q)] += s.dyn[size_t(q)] * s.xhat[size_t(q)];
        mean += s.dyn[size_t(q)] * nw[q] * s.xhat[size_t(q)];
      }
      mean /= float(P);
      for (int64_t q = 0; q < P; ++q) dyr[q] = rstd * (s.dyn[size_t(q)] * nw[q] - s.xhat[size_t(q)] * mean);
    } else {
      for (int64_t q = 0; q < P; ++q) dyr[q] = s.dyn[size_t(q)];
    }
  }
}

// q, k (rotated, biased), v and the chunk-local decay prefix Λ for tokens [c0, c0 + T).
void build_chunk(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t h, int64_t c0, int64_t T, const float* zx,
                 BwdScratch& s) {
  const int64_t H = c.nheads(), P = c.headdim, N = c.d_state, R = c.rank(), S = c.num_angles(), G = c.ngroups;
  const int64_t d_in = c.d_in_proj(), g = h / (H / G);
  float run = 0;
  for (int64_t tl = 0; tl < T; ++tl) {
    const int64_t t = c0 + tl;
    const float* row = zx + t * d_in;
    const float* cs = s.cs.data() + t * S;
    const float* sn = s.sn.data() + t * S;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t j = tl * R + r;
      bias_rotate(row + c.off_C() + (r * G + g) * N, p.C_bias + (h * R + r) * N, cs, sn, N, S, c.is_mimo,
                  s.q.data() + j * N);
      bias_rotate(row + c.off_B() + (r * G + g) * N, p.B_bias + (h * R + r) * N, cs, sn, N, S, c.is_mimo,
                  s.k.data() + j * N);
      const float* x = row + c.off_x() + h * P;
      float* v = s.v.data() + j * P;
      if (c.is_mimo) {
        const float* mx = p.mimo_x + (h * R + r) * P;
        for (int64_t q = 0; q < P; ++q) v[q] = mx[q] * x[q];
      } else {
        std::copy_n(x, P, v);
      }
    }
    run += s.A[size_t(t)] * s.dt[size_t(t)];
    s.Lam[size_t(tl)] = run;
  }
}

// A head's per-token B/C gradient row (dBn/dCn: tens of MB per layer, read back only by the B/C norm backward after
// every head's task) stored past the caches: no read-for-ownership of lines that are not read before being evicted.
// 10M-class CPU training (8 × 256, 2 threads, seven alternating pairs): MIMO R = 4 +2–4 %, SISO +3 %; the same bits.
inline void store_row_streamed(float* dst, const float* src, int64_t n) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0 && n % 4 == 0) {
    for (int64_t i = 0; i < n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    return;
  }
#endif
  std::copy_n(src, n, dst);
}

// coef(t, s) of the intra-chunk weights (spec §5.3): e^{Λ_t−Λ_s}·scale_s below the diagonal, γ_t on it.
inline float coef(const BwdScratch& s, int64_t c0, int64_t tl, int64_t sl) {
  if (sl < tl) return std::exp(s.Lam[size_t(tl)] - s.Lam[size_t(sl)]) * s.scale_all[size_t(c0 + sl)];
  if (sl == tl) return s.lam[size_t(c0 + tl)] * s.dt[size_t(c0 + tl)];
  return 0.0f;
}

void backward_head(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t h, int64_t L, const TaskIO& io,
                   HeadGrads& g, BwdScratch& s) {
  const int64_t H = c.nheads(), P = c.headdim, N = c.d_state, R = c.rank(), S = c.num_angles(), PN = P * N;
  const int64_t d_in = c.d_in_proj(), d_inner = c.d_inner(), C = c.chunk_size;
  const bool mimo = c.is_mimo;
  const float Dh = p.D[h];
  const float* zx = io.zx;
  auto mx = [&](int64_t r, int64_t q) { return mimo ? p.mimo_x[(h * R + r) * P + q] : 1.0f; };

  for (int64_t t = 0; t < L; ++t) {
    ScalarsGrad sg = scalars_grad(c, zx + t * d_in, h, p.dt_bias);
    s.dt[size_t(t)] = sg.dt, s.A[size_t(t)] = sg.A, s.lam[size_t(t)] = sg.lam;
    s.dAdl[size_t(t)] = sg.dA_dlogit, s.dsp[size_t(t)] = sg.dsp;
  }
  for (int64_t t = 0; t < L; ++t)
    s.scale_all[size_t(t)] =
        s.lam[size_t(t)] * s.dt[size_t(t)] + (t + 1 < L ? (1.0f - s.lam[size_t(t + 1)]) * s.dt[size_t(t + 1)] : 0.0f);
  // Angles φ_t for every token (wrapped as the forward does).
  for (int64_t i = 0; i < S; ++i) s.phi[size_t(i)] = io.init_angle ? io.init_angle[h * S + i] : 0.0f;
  for (int64_t t = 0; t < L; ++t)
    advance_angles_tanh(c, io.th + t * S, s.dt[size_t(t)], s.phi.data(), s.cs.data() + t * S, s.sn.data() + t * S);

  // The effective initial state: h_{−1} plus the pending (k, x) pair with σ̄_0 (spec §5.1).
  float* Hs = s.H.data();
  const float sig0 = (1.0f - s.lam[0]) * s.dt[0];
  if (io.init_ssm) std::copy_n(io.init_ssm + h * PN, PN, Hs);
  else std::fill_n(Hs, PN, 0.0f);
  if (io.init_k && io.init_v)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t q = 0; q < P; ++q) {
        const float vq = sig0 * mx(r, q) * io.init_v[h * P + q];
        for (int64_t n = 0; n < N; ++n) Hs[q * N + n] += vq * io.init_k[(r * H + h) * N + n];
      }

  // 1. Forward over chunks: keep H at each chunk start, run the output stage's backward.
  for (int64_t c0 = 0, ci = 0; c0 < L; c0 += C, ++ci) {
    const int64_t T = std::min(C, L - c0), rows = T * R;
    build_chunk(c, p, h, c0, T, zx, s);
    std::copy_n(Hs, PN, s.Hc.data() + ci * PN);
    float* W = s.sm.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(rows), int(N), 1.0f, s.q.data(), int(N),
                s.k.data(), int(N), 0.0f, W, int(rows));
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t jj = 0; jj < rows; ++jj) W[j * rows + jj] *= coef(s, c0, j / R, jj / R);
    float* Y = s.y.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(P), int(N), 1.0f, s.q.data(), int(N), Hs,
                int(N), 0.0f, Y, int(P));
    for (int64_t j = 0; j < rows; ++j) {
      const float decay = std::exp(s.Lam[size_t(j / R)]);
      for (int64_t q = 0; q < P; ++q) Y[j * P + q] = decay * Y[j * P + q] + Dh * s.v[size_t(j * P + q)];
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(P), int(rows), 1.0f, W, int(rows),
                s.v.data(), int(P), 1.0f, Y, int(P));
    const float last = s.Lam[size_t(T - 1)];
    for (int64_t jj = 0; jj < rows; ++jj) {
      const float w = std::exp(last - s.Lam[size_t(jj / R)]) * s.scale_all[size_t(c0 + jj / R)];
      for (int64_t q = 0; q < P; ++q) s.tp[size_t(jj * P + q)] = w * s.v[size_t(jj * P + q)];
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(P), int(N), int(rows), 1.0f, s.tp.data(), int(P),
                s.k.data(), int(N), std::exp(last), Hs, int(N));
    for (int64_t tl = 0; tl < T; ++tl) {
      const int64_t t = c0 + tl;
      output_stage_backward(c, p, h, Y + tl * R * P, zx + t * d_in + h * P, io.dO + t * d_inner + h * P,
                            io.o + t * d_inner + h * P, s.dy.data() + t * R * P, io.dzx + t * d_in + h * P, g, s);
    }
  }

  // 2. Reverse over chunks.
  std::fill(s.dH.begin(), s.dH.end(), 0.0f);
  std::fill(s.dPhi.begin(), s.dPhi.end(), 0.0f);
  std::fill(s.dgam.begin(), s.dgam.end(), 0.0f);
  std::fill(s.dscale.begin(), s.dscale.end(), 0.0f);
  float* dH = s.dH.data();
  const int64_t chunks = (L + C - 1) / C;
  for (int64_t ci = chunks - 1; ci >= 0; --ci) {
    const int64_t c0 = ci * C, T = std::min(C, L - c0), rows = T * R;
    build_chunk(c, p, h, c0, T, zx, s);
    const float* Q = s.q.data();
    const float* K = s.k.data();
    const float* V = s.v.data();
    const float* dY = s.dy.data() + c0 * R * P;
    const float* Hc = s.Hc.data() + ci * PN;
    float* Sm = s.sm.data();
    float* dW = s.dw.data();
    std::fill_n(s.dLam.begin(), T, 0.0f);
    std::fill_n(s.dws.begin(), T, 0.0f);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(rows), int(N), 1.0f, Q, int(N), K, int(N),
                0.0f, Sm, int(rows));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(rows), int(P), 1.0f, dY, int(P), V, int(P),
                0.0f, dW, int(rows));
    // Per entry: the gradient of coef (→ Λ, scale, γ), then Sm ← W = S ⊙ coef and dW ← dS = dW ⊙ coef.
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t tl = j / R;
      for (int64_t jj = 0; jj < rows; ++jj) {
        const int64_t sl = jj / R;
        const float cf = coef(s, c0, tl, sl);
        const float gc = dW[j * rows + jj] * Sm[j * rows + jj];  // d loss / d coef(t, s), this (r, r′) pair
        if (sl < tl) {
          const float G = gc * cf;
          s.dLam[size_t(tl)] += G;
          s.dLam[size_t(sl)] -= G;
          s.dscale[size_t(c0 + sl)] += gc * std::exp(s.Lam[size_t(tl)] - s.Lam[size_t(sl)]);
        } else if (sl == tl) {
          s.dgam[size_t(c0 + tl)] += gc;
        }
        Sm[j * rows + jj] *= cf;
        dW[j * rows + jj] *= cf;
      }
    }
    float* dQ = s.dq.data();
    float* dK = s.dk.data();
    float* dV = s.dv.data();
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(rows), int(P), int(rows), 1.0f, Sm, int(rows), dY, int(P),
                0.0f, dV, int(P));
    float d_sum = g.D;  // in a register: through g.D each step waited on the previous one's store (the same sums)
    for (int64_t i = 0; i < rows * P; ++i) {
      dV[i] += Dh * dY[i];
      d_sum += dY[i] * V[i];
    }
    g.D = d_sum;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(N), int(rows), 1.0f, dW, int(rows), K, int(N),
                0.0f, dQ, int(N));
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(rows), int(N), int(rows), 1.0f, dW, int(rows), Q, int(N),
                0.0f, dK, int(N));
    // The read of the chunk-start state: y += e^{Λ_t}·H_c·q.
    float* tp = s.tp.data();
    float* dys = s.dys.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(P), int(N), 1.0f, Q, int(N), Hc, int(N), 0.0f,
                tp, int(P));
    for (int64_t j = 0; j < rows; ++j) {
      const float e = std::exp(s.Lam[size_t(j / R)]);
      float dot = 0;
      for (int64_t q = 0; q < P; ++q) {
        dot += dY[j * P + q] * tp[j * P + q];
        dys[j * P + q] = e * dY[j * P + q];
      }
      s.dLam[size_t(j / R)] += e * dot;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(N), int(P), 1.0f, dys, int(P), Hc, int(N),
                1.0f, dQ, int(N));
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(P), int(N), int(rows), 1.0f, dys, int(P), Q, int(N), 0.0f,
                s.dHc.data(), int(N));
    // The state carried out of the chunk: H_next = e^{Λ_last}·H_c + Σ_s w_s·v_s k_sᵀ.
    const float last = s.Lam[size_t(T - 1)], elast = std::exp(last);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(P), int(N), 1.0f, K, int(N), dH, int(N), 0.0f,
                tp, int(P));
    float* tn = s.tn.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(N), int(P), 1.0f, V, int(P), dH, int(N), 0.0f,
                tn, int(N));
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t sl = j / R;
      const float e2 = std::exp(last - s.Lam[size_t(sl)]), w = e2 * s.scale_all[size_t(c0 + sl)];
      float dot = 0;
      for (int64_t q = 0; q < P; ++q) {
        dot += V[j * P + q] * tp[j * P + q];
        dV[j * P + q] += w * tp[j * P + q];
      }
      for (int64_t n = 0; n < N; ++n) dK[j * N + n] += w * tn[j * N + n];
      s.dws[size_t(sl)] += dot;
    }
    for (int64_t sl = 0; sl < T; ++sl) {
      const float e2 = std::exp(last - s.Lam[size_t(sl)]), G = s.dws[size_t(sl)] * e2 * s.scale_all[size_t(c0 + sl)];
      s.dLam[size_t(T - 1)] += G;
      s.dLam[size_t(sl)] -= G;
      s.dscale[size_t(c0 + sl)] += s.dws[size_t(sl)] * e2;
    }
    {
      float dot = 0;
      for (int64_t i = 0; i < PN; ++i) dot += dH[i] * Hc[i];
      s.dLam[size_t(T - 1)] += elast * dot;
      for (int64_t i = 0; i < PN; ++i) dH[i] = elast * dH[i] + s.dHc[size_t(i)];
    }
    // Λ_t = Σ_{j ≤ t in chunk} A_j·Δ_j.
    float run = 0;
    for (int64_t tl = T - 1; tl >= 0; --tl) run += s.dLam[size_t(tl)], s.dadt[size_t(c0 + tl)] = run;

    // Per token, last to first: rotation, bias, values; the angle gradient's reverse cumulative sum.
    for (int64_t tl = T - 1; tl >= 0; --tl) {
      const int64_t t = c0 + tl;
      const float* row = zx + t * d_in;
      const float* cs = s.cs.data() + t * S;
      const float* sn = s.sn.data() + t * S;
      std::fill(s.dphi.begin(), s.dphi.end(), 0.0f);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t j = tl * R + r;
        for (int which = 0; which < 2; ++which) {
          float* dvec = (which == 0 ? dQ : dK) + j * N;
          const float* vec = (which == 0 ? Q : K) + j * N;
          const int64_t stride = mimo ? 1 : 2, partner = mimo ? N / 2 : 1;
          for (int64_t i = 0; i < S; ++i) {
            const int64_t a = i * stride, b = a + partner;
            const float da = dvec[a], db = dvec[b];
            s.dphi[size_t(i)] += db * vec[a] - da * vec[b];
            dvec[a] = da * cs[i] + db * sn[i];
            dvec[b] = db * cs[i] - da * sn[i];
          }
          float* dst = (which == 0 ? io.dCn : io.dBn) + ((t * H + h) * R + r) * N;
          float* dbias = (which == 0 ? g.C_bias : g.B_bias).data() + r * N;
          store_row_streamed(dst, dvec, N);
          for (int64_t n = 0; n < N; ++n) dbias[n] += dvec[n];
        }
        const float* x = row + c.off_x() + h * P;
        float* dx = io.dzx + t * d_in + c.off_x() + h * P;
        const float* dv = dV + j * P;
        for (int64_t q = 0; q < P; ++q) {
          dx[q] += dv[q] * mx(r, q);
          if (mimo) g.mimo_x[size_t(r * P + q)] += dv[q] * x[q];
        }
      }
      float ang = 0;
      for (int64_t i = 0; i < S; ++i) {
        s.dPhi[size_t(i)] += s.dphi[size_t(i)];
        // no_rotary: the increments are 0 whatever θ and Δ are, so neither gets a gradient from the angles.
        if (c.no_rotary) {
          io.dth[(t * H + h) * S + i] = 0.0f;
          continue;
        }
        const float th = io.th[t * S + i];
        ang += s.dPhi[size_t(i)] * kPiF * th;
        io.dth[(t * H + h) * S + i] = s.dPhi[size_t(i)] * kPiF * s.dt[size_t(t)] * (1.0f - th * th);
      }
      s.ddt_ang[size_t(t)] = ang;
    }
  }

  // The initial state and its pending pair (spec §5.1): H_init = h_{−1} + σ̄_0·Σ_r v_{−1,r} k_{−1,r}ᵀ.
  float dsig0 = 0;
  if (io.init_k && io.init_v) {
    for (int64_t r = 0; r < R; ++r) {
      const float* kp = io.init_k + (r * H + h) * N;
      for (int64_t q = 0; q < P; ++q) {
        const float vq = mx(r, q) * io.init_v[h * P + q];
        float hk = 0;
        for (int64_t n = 0; n < N; ++n) hk += dH[q * N + n] * kp[n];
        dsig0 += vq * hk;
        const float dvq = sig0 * hk;  // gradient of v_{−1,r}[q]
        if (io.d_v) io.d_v[h * P + q] += dvq * mx(r, q);
        if (mimo) g.mimo_x[size_t(r * P + q)] += dvq * io.init_v[h * P + q];
      }
      if (io.d_k)
        for (int64_t n = 0; n < N; ++n) {
          float acc = 0;
          for (int64_t q = 0; q < P; ++q) acc += dH[q * N + n] * mx(r, q) * io.init_v[h * P + q];
          io.d_k[(r * H + h) * N + n] = sig0 * acc;
        }
    }
  }
  if (io.d_ssm) std::copy_n(dH, PN, io.d_ssm + h * PN);
  if (io.d_angle) std::copy_n(s.dPhi.data(), S, io.d_angle + h * S);

  // Scalars: scale_t = γ_t + (1−λ_{t+1})·Δ_{t+1}, γ_t = λ_t·Δ_t, A·Δ, and Δ's share of the angle increments.
  for (int64_t t = 0; t < L; ++t) {
    const float dt = s.dt[size_t(t)], lam = s.lam[size_t(t)];
    const float dgam = s.dgam[size_t(t)] + s.dscale[size_t(t)];
    const float dsig = t > 0 ? s.dscale[size_t(t - 1)] : dsig0;
    const float ddt = s.dadt[size_t(t)] * s.A[size_t(t)] + dgam * lam + dsig * (1.0f - lam) + s.ddt_ang[size_t(t)];
    const float dlam = (dgam - dsig) * dt;
    float* dz = io.dzx + t * d_in;
    const float dsp = ddt * s.dsp[size_t(t)];
    dz[c.off_dt() + h] = dsp;
    g.dt_bias += dsp;
    dz[c.off_A() + h] = s.dadt[size_t(t)] * dt * s.dAdl[size_t(t)];
    dz[c.off_trap() + h] = c.euler ? 0.0f : dlam * lam * (1.0f - lam);  // euler: λ does not depend on trap
  }
}

// The call's large buffers (the layer's (B·L, …) activations and gradients), kept by the calling thread between calls.
// Allocated anew each call, they were zero-filled every time, and those above glibc's mmap threshold (dBn and dCn of
// a 10M-class MIMO layer at 8 × 256 tokens: 33.5 MB each) came as fresh pages, faulted in each time: 16 % of a MIMO
// training step in memset and page faults; kept, that step ran 1.5× as fast (docs/perf.md). No contents carry over:
// the backward writes every element before it reads it, or clears it first (dzx).
struct BackwardBuffers {
  std::vector<float> zx_raw, zx, dO, o, dzx, dBn, dCn, dth, th;
};

BackwardBuffers& backward_buffers() {
  thread_local BackwardBuffers buffers;
  return buffers;
}

// v's storage for at least n floats (grown, never shrunk; new storage is not copied from the old).
float* at_least(std::vector<float>& v, int64_t n) {
  if (v.size() < size_t(n)) {
    std::vector<float>().swap(v);
    v.resize(size_t(n));
  }
  return v.data();
}

}  // namespace

void mamba3_backward(const Mamba3Config& c, const Mamba3ReferenceWeights& w, int64_t batch, int64_t L, const float* u,
                     const float* dout, const Mamba3StateView* init, const Mamba3GradViews& grads, float* du,
                     const Mamba3StateView* dinit, const float* zx_raw_kept) {
  if (batch == 0 || L == 0) return;
  use_single_threaded_blas();
  const int64_t D = c.d_model, di = c.d_inner(), din = c.d_in_proj(), H = c.nheads(), P = c.headdim, N = c.d_state;
  const int64_t R = c.rank(), G = c.ngroups, S = c.num_angles(), M = batch * L;
  const Mamba3HeadParams& p = w.head;

  // Forward projections: zx_raw = u·W_inᵀ (or the forward's, kept), zx = the same with B/C normalised; dO = dout·W_out.
  BackwardBuffers& buf = backward_buffers();
  float* zx_raw_own = zx_raw_kept ? nullptr : at_least(buf.zx_raw, M * din);
  float *zx = at_least(buf.zx, M * din), *dO = at_least(buf.dO, M * di), *o = at_least(buf.o, M * di);
  if (!zx_raw_kept) linear(u, M, D, w.in_proj, din, zx_raw_own);
  const float* zx_raw = zx_raw_kept ? zx_raw_kept : zx_raw_own;
  std::copy_n(zx_raw, M * din, zx);
  mamba3_normalize_bc(c, w.B_norm, w.C_norm, M, zx);
  gemm_rows(false, false, M, di, D, dout, D, w.out_proj, di, 0.0f, dO, di);

  // Every element of dBn, dCn and dth is written by its head's task; dzx's x columns are sums over the ranks.
  float *dzx = at_least(buf.dzx, M * din), *dBn = at_least(buf.dBn, M * H * R * N),
        *dCn = at_least(buf.dCn, M * H * R * N), *dth = at_least(buf.dth, M * H * S);
  std::fill_n(dzx, M * din, 0.0f);
  std::vector<HeadGrads> hg(size_t(batch * H));
  for (HeadGrads& g : hg) {
    g.B_bias.assign(size_t(R * N), 0.0f), g.C_bias.assign(size_t(R * N), 0.0f);
    g.mimo_x.assign(size_t(R * P), 0.0f), g.mimo_z.assign(size_t(R * P), 0.0f), g.mimo_o.assign(size_t(R * P), 0.0f);
    g.norm.assign(size_t(P), 0.0f);
  }
  if (dinit) {
    std::fill_n(dinit->angle, batch * H * S, 0.0f), std::fill_n(dinit->ssm, batch * H * P * N, 0.0f);
    std::fill_n(dinit->k, batch * R * H * N, 0.0f), std::fill_n(dinit->v, batch * H * P, 0.0f);
  }
  // tanh θ once per token (every head's angle recompute and angle gradient reads it).
  float* th = at_least(buf.th, M * S);
  parallel_for(M, [&](int64_t row) {
    for (int64_t i = 0; i < S; ++i) th[row * S + i] = std::tanh(zx[row * din + c.off_angles() + i]);
  });
  std::vector<BwdScratch> scratch(static_cast<size_t>(max_threads()));
  parallel_for(batch * H, [&](int64_t task) {
    const int64_t b = task / H, h = task % H;
    BwdScratch& s = scratch[size_t(thread_index())];
    if (s.dt.size() != size_t(L)) s.resize(c, L);
    TaskIO io{zx + b * L * din,
              dO + b * L * di,
              o + b * L * di,
              dzx + b * L * din,
              dBn + b * L * H * R * N,
              dCn + b * L * H * R * N,
              dth + b * L * H * S,
              th + b * L * S,
              init ? init->angle + b * H * S : nullptr,
              init ? init->ssm + b * H * P * N : nullptr,
              init ? init->k + b * R * H * N : nullptr,
              init ? init->v + b * H * P : nullptr,
              dinit ? dinit->angle + b * H * S : nullptr,
              dinit ? dinit->ssm + b * H * P * N : nullptr,
              dinit ? dinit->k + b * R * H * N : nullptr,
              dinit ? dinit->v + b * H * P : nullptr};
    backward_head(c, p, h, L, io, hg[size_t(task)], s);
#if defined(__SSE2__)
    _mm_sfence();  // (the task's streamed rows visible before the B/C norm backward reads them on any thread)
#endif
  });

  // Heads into their B/C groups, the B/C RMSNorms, θ summed over heads. The norm weights' gradients are summed per
  // fixed block of rows, then over blocks in order: the same bits whatever the thread count and the schedule (a
  // per-thread sum under dynamic scheduling made training runs differ between two identical calls).
  constexpr int64_t kRowsPerBlock = 64;
  const int64_t blocks = (M + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<float> gBn(size_t(blocks * N), 0.0f), gCn(size_t(blocks * N), 0.0f);
  auto norm_rows = [&](int64_t row, float* gb, float* gc) {
    float* dz = dzx + row * din;
    const float* raw = zx_raw + row * din;
    std::vector<float> acc(static_cast<size_t>(N));
    for (int which = 0; which < 2; ++which) {
      const float* dsrc = (which == 0 ? dBn : dCn) + row * H * R * N;
      const float* wt = which == 0 ? w.B_norm : w.C_norm;
      const int64_t off = which == 0 ? c.off_B() : c.off_C();
      float* gw = which == 0 ? gb : gc;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t g = 0; g < G; ++g) {
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t h = g * (H / G); h < (g + 1) * (H / G); ++h)
            for (int64_t n = 0; n < N; ++n) acc[size_t(n)] += dsrc[(h * R + r) * N + n];
          const float* x = raw + off + (r * G + g) * N;
          float ss = 0;
          for (int64_t n = 0; n < N; ++n) ss += x[n] * x[n];
          const float rstd = 1.0f / std::sqrt(ss / float(N) + kNormEps);
          float mean = 0;
          for (int64_t n = 0; n < N; ++n) {
            gw[n] += acc[size_t(n)] * x[n] * rstd;
            mean += acc[size_t(n)] * wt[n] * x[n] * rstd;
          }
          mean /= float(N);
          float* dxo = dz + off + (r * G + g) * N;
          for (int64_t n = 0; n < N; ++n) dxo[n] = rstd * (acc[size_t(n)] * wt[n] - x[n] * rstd * mean);
        }
    }
    const float* th = dth + row * H * S;
    for (int64_t i = 0; i < S; ++i) {
      float a = 0;
      for (int64_t h = 0; h < H; ++h) a += th[h * S + i];
      dz[c.off_angles() + i] = a;
    }
  };
  parallel_for(blocks, [&](int64_t blk) {
    for (int64_t row = blk * kRowsPerBlock; row < std::min(M, (blk + 1) * kRowsPerBlock); ++row)
      norm_rows(row, gBn.data() + blk * N, gCn.data() + blk * N);
  });
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t n = 0; n < N; ++n)
      grads.B_norm[n] += gBn[size_t(blk * N + n)], grads.C_norm[n] += gCn[size_t(blk * N + n)];

  // Projections: du = dzx·W_in, dW_in += dzxᵀ·u, dW_out += doutᵀ·o.
  gemm_rows(false, false, M, D, din, dzx, din, w.in_proj, D, 0.0f, du, D);
  gemm_rows(true, false, din, D, M, dzx, din, u, D, 1.0f, grads.in_proj, D);
  gemm_rows(true, false, D, di, M, dout, D, o, di, 1.0f, grads.out_proj, di);

  // Per-head partials summed over batch rows.
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const HeadGrads& g = hg[size_t(b * H + h)];
      grads.dt_bias[h] += g.dt_bias;
      grads.D[h] += g.D;
      for (int64_t i = 0; i < R * N; ++i)
        grads.B_bias[h * R * N + i] += g.B_bias[size_t(i)], grads.C_bias[h * R * N + i] += g.C_bias[size_t(i)];
      if (c.is_mimo)
        for (int64_t i = 0; i < R * P; ++i) {
          grads.mimo_x[h * R * P + i] += g.mimo_x[size_t(i)];
          grads.mimo_z[h * R * P + i] += g.mimo_z[size_t(i)];
          grads.mimo_o[h * R * P + i] += g.mimo_o[size_t(i)];
        }
      if (p.norm && grads.norm)
        for (int64_t q = 0; q < P; ++q) grads.norm[h * P + q] += g.norm[size_t(q)];
    }
}

}  // namespace mamba3
