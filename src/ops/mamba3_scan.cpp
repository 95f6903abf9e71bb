#include "ops/mamba3_scan.h"

#include <algorithm>
#include <cblas.h>

#include <cmath>

#include "core/parallel.h"
#include "ops/linear.h"

namespace mamba3 {

using namespace detail;

void mamba3_normalize_bc(const Mamba3Config& c, const float* B_norm, const float* C_norm, int64_t rows, float* zx) {
  const int64_t count = c.rank() * c.ngroups, N = c.d_state, d_in = c.d_in_proj();
  parallel_for(rows, [&](int64_t row) {
    float* r = zx + row * d_in;
    rmsnorm_rows(r + c.off_B(), count, N, B_norm);
    rmsnorm_rows(r + c.off_C(), count, N, C_norm);
  });
}

namespace {

// Per-thread buffers for one (row, head) task; sized once per call.
struct ScanScratch {
  std::vector<float> dt, adt, lam;        // (L)
  std::vector<float> q, k;                // (C·R, N)
  std::vector<float> v, y, vw;            // (C·R, P)
  std::vector<float> w;                   // (C·R, C·R) score weights
  std::vector<float> Lam, scale;          // (C)
  std::vector<float> phi, cs, sn;         // (S)
  std::vector<float> state;               // (P, N)

  void resize(const Mamba3Config& c, int64_t L) {
    const int64_t C = std::min(c.chunk_size, L), R = c.rank(), N = c.d_state, P = c.headdim, S = c.num_angles();
    dt.resize(L), adt.resize(L), lam.resize(L);
    q.resize(C * R * N), k.resize(C * R * N), v.resize(C * R * P), y.resize(C * R * P), vw.resize(C * R * P);
    w.resize(C * R * C * R), Lam.resize(C), scale.resize(C);
    phi.resize(S), cs.resize(S), sn.resize(S), state.resize(P * N);
  }
};

// th: (L, S) tanh θ of the sequence's tokens, shared by its heads.
void scan_head(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t h, int64_t L, const float* zx,
               const float* th, const Mamba3StateView& st, float* o, ScanScratch& s) {
  const int64_t H = c.nheads(), P = c.headdim, N = c.d_state, R = c.rank(), S = c.num_angles(), G = c.ngroups;
  const int64_t d_in = c.d_in_proj(), d_inner = c.d_inner(), g = h / (H / G), C = c.chunk_size;
  const bool mimo = c.is_mimo;
  const float Dh = p.D[h];

  for (int64_t t = 0; t < L; ++t) {
    HeadScalars hs = head_scalars(c, zx + t * d_in, h, p.dt_bias);
    s.dt[t] = hs.dt, s.adt[t] = hs.adt, s.lam[t] = hs.lam;
  }
  float* Hs = s.state.data();
  std::copy_n(st.ssm + h * P * N, P * N, Hs);
  std::copy_n(st.angle + h * S, S, s.phi.data());

  // A pending (k, x) pair from the cache enters like a token at position −1 (spec §5.1).
  {
    const float sig0 = (1.0f - s.lam[0]) * s.dt[0];
    const float* xprev = st.v + h * P;
    for (int64_t r = 0; r < R; ++r) {
      const float* kp = st.k + (r * H + h) * N;
      const float* mx = mimo ? p.mimo_x + (h * R + r) * P : nullptr;
      for (int64_t q = 0; q < P; ++q) {
        float vq = sig0 * (mx ? mx[q] * xprev[q] : xprev[q]);
        float* row = Hs + q * N;
        for (int64_t n = 0; n < N; ++n) row[n] += vq * kp[n];
      }
    }
  }

  for (int64_t c0 = 0; c0 < L; c0 += C) {
    const int64_t T = std::min(C, L - c0), rows = T * R;
    // Build q, k, v and the decay prefix for the chunk.
    float run = 0;
    for (int64_t tl = 0; tl < T; ++tl) {
      const int64_t t = c0 + tl;
      const float* row = zx + t * d_in;
      advance_angles_tanh(c, th + t * S, s.dt[t], s.phi.data(), s.cs.data(), s.sn.data());
      for (int64_t r = 0; r < R; ++r) {
        const int64_t j = tl * R + r;
        bias_rotate(row + c.off_C() + (r * G + g) * N, p.C_bias + (h * R + r) * N, s.cs.data(), s.sn.data(), N, S,
                    mimo, s.q.data() + j * N);
        bias_rotate(row + c.off_B() + (r * G + g) * N, p.B_bias + (h * R + r) * N, s.cs.data(), s.sn.data(), N, S,
                    mimo, s.k.data() + j * N);
        const float* x = row + c.off_x() + h * P;
        float* v = s.v.data() + j * P;
        if (mimo) {
          const float* mx = p.mimo_x + (h * R + r) * P;
          for (int64_t q = 0; q < P; ++q) v[q] = mx[q] * x[q];
        } else {
          std::copy_n(x, P, v);
        }
      }
      run += s.adt[t];
      s.Lam[tl] = run;
      const float next_sigma = t + 1 < L ? (1.0f - s.lam[t + 1]) * s.dt[t + 1] : 0.0f;
      s.scale[tl] = s.lam[t] * s.dt[t] + next_sigma;
    }

    // Scores q·k for the whole chunk (one small GEMM), then the causal weights: strictly earlier steps decay and
    // use scale, the same step uses γ (spec §5.3), later steps are masked.
    float* W = s.w.data();
    const float* Q = s.q.data();
    const float* K = s.k.data();
    const float* V = s.v.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(rows), int(N), 1.0f, Q, int(N), K, int(N), 0.0f,
                W, int(rows));
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t tl = j / R;
      float* wrow = W + j * rows;
      for (int64_t jj = 0; jj < rows; ++jj) {
        const int64_t sl = jj / R;
        const float coef = sl < tl    ? std::exp(s.Lam[tl] - s.Lam[sl]) * s.scale[sl]
                           : sl == tl ? s.lam[c0 + tl] * s.dt[c0 + tl]
                                      : 0.0f;
        wrow[jj] *= coef;
      }
    }
    // y = e^{Λ_t}·(q·Hᵀ) + D·v + W·v
    float* Y = s.y.data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(P), int(N), 1.0f, Q, int(N), Hs, int(N), 0.0f, Y,
                int(P));
    for (int64_t j = 0; j < rows; ++j) {
      const float decay = std::exp(s.Lam[j / R]);
      for (int64_t q = 0; q < P; ++q) Y[j * P + q] = decay * Y[j * P + q] + Dh * V[j * P + q];
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(P), int(rows), 1.0f, W, int(rows), V, int(P),
                1.0f, Y, int(P));
    // Carry the state to the chunk's end: H ← e^{Λ_last}·H + (w ⊙ V)ᵀ·K.
    {
      const float last = s.Lam[T - 1];
      float* VW = s.vw.data();
      for (int64_t jj = 0; jj < rows; ++jj) {
        const float w = std::exp(last - s.Lam[jj / R]) * s.scale[jj / R];
        for (int64_t q = 0; q < P; ++q) VW[jj * P + q] = w * V[jj * P + q];
      }
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(P), int(N), int(rows), 1.0f, VW, int(P), K, int(N),
                  std::exp(last), Hs, int(N));
    }
    for (int64_t tl = 0; tl < T; ++tl) {
      const int64_t t = c0 + tl;
      output_stage(c, p, h, s.y.data() + tl * R * P, zx + t * d_in + h * P, o + t * d_inner + h * P);
    }
    if (c0 + T == L) {  // final decode state (spec §5.4): k of the last token unscaled, x of the last token
      for (int64_t r = 0; r < R; ++r) std::copy_n(s.k.data() + ((T - 1) * R + r) * N, N, st.k + (r * H + h) * N);
      std::copy_n(zx + (L - 1) * d_in + c.off_x() + h * P, P, st.v + h * P);
    }
  }
  std::copy_n(Hs, P * N, st.ssm + h * P * N);
  std::copy_n(s.phi.data(), S, st.angle + h * S);
}

}  // namespace

void mamba3_scan(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t batch, int64_t L, const float* zx,
                 Mamba3StateView state, float* o) {
  if (L == 0) return;
  use_single_threaded_blas();  // the chunk GEMMs run inside our threads
  const int64_t H = c.nheads(), P = c.headdim, N = c.d_state, R = c.rank(), S = c.num_angles();
  // tanh θ once per token (every head's angle scan reads it).
  const int64_t d_in = c.d_in_proj();
  std::vector<float> th(size_t(batch * L * S));
  parallel_for(batch * L, [&](int64_t row) {
    for (int64_t i = 0; i < S; ++i) th[size_t(row * S + i)] = std::tanh(zx[row * d_in + c.off_angles() + i]);
  });
  std::vector<ScanScratch> scratch(static_cast<size_t>(max_threads()));
  parallel_for(batch * H, [&](int64_t task) {
    const int64_t b = task / H, h = task % H;
    ScanScratch& s = scratch[size_t(thread_index())];
    if (s.dt.size() != size_t(L)) s.resize(c, L);
    Mamba3StateView st{state.angle + b * H * S, state.ssm + b * H * P * N, state.k + b * R * H * N,
                       state.v + b * H * P};
    scan_head(c, p, h, L, zx + b * L * d_in, th.data() + b * L * S, st, o + b * L * c.d_inner(), s);
  });
}

}  // namespace mamba3
